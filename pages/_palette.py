"""The palette both Compose and the campaign form use: a contact's field or a tracked link put into a
text without writing template syntax. Not a page (a leading underscore: navigation lists pages)."""

from collections.abc import Callable

import streamlit as st

from smsops import composer
from smsops.i18n import _


def insert_field(target: Callable[[], str], prefix: str) -> None:
    """The palette's field, put at the end of the text (runs before the text area is drawn again)."""
    snippet = composer.field_snippet(
        st.session_state[f"{prefix}_field"], st.session_state.get(f"{prefix}_if_empty", "")
    )
    st.session_state[target()] = composer.insert(st.session_state.get(target(), ""), snippet)


def insert_link(target: Callable[[], str], prefix: str) -> None:
    """The palette's tracked link, put at the end of the text; the address box is emptied."""
    try:
        snippet = composer.link_snippet(st.session_state.get(f"{prefix}_link", ""))
    except composer.PaletteError:
        st.session_state[f"{prefix}_link_refused"] = True  # said beside the address box
        return
    st.session_state[target()] = composer.insert(st.session_state.get(target(), ""), snippet)
    st.session_state[f"{prefix}_link"] = ""


def palette(target: Callable[[], str], prefix: str, fields: dict[str, str]) -> None:
    """Fields and a tracked link, inserted without writing template syntax into the text whose key
    ``target()`` gives when the button is clicked."""
    f1, f2, f3 = st.columns([4, 3, 3], vertical_alignment="bottom")
    f1.selectbox(_("Field"), list(fields), key=f"{prefix}_field", format_func=fields.get,
                 help=_("What the contact's record holds: each recipient reads their own"))  # fmt: skip
    f2.text_input(_("If a contact has none, write"), key=f"{prefix}_if_empty", placeholder=_("(nothing)"))
    f3.button(_("Insert field"), key=f"{prefix}_insert_field", on_click=insert_field, args=(target, prefix),
              width="stretch")  # fmt: skip
    l1, l2 = st.columns([7, 3], vertical_alignment="bottom")
    address = l1.text_input(_("Tracked link to"), key=f"{prefix}_link", placeholder="https://shop.example.ru/sale",
                            help=_("Each recipient gets a short link of their own, so clicks are counted"))  # fmt: skip
    l2.button(_("Insert link"), key=f"{prefix}_insert_link", on_click=insert_link, args=(target, prefix),
              width="stretch")  # fmt: skip
    if address.strip() or st.session_state.pop(f"{prefix}_link_refused", False):  # not inserted: why
        try:
            composer.link_snippet(address)
        except composer.PaletteError as exc:
            st.error(str(exc))
    st.caption(_("Template syntax works too, as typed: {example}").format(
        example="`{{ city | default('…') }}`, `{% if … %}…{% endif %}`"))  # fmt: skip
