"""smsops: the Streamlit entry point. Language, navigation and page config, nothing else."""

from pathlib import Path

import streamlit as st

from smsops import i18n
from smsops.i18n import _

# The icon is a file of ours: a Material icon name would make the browser fetch it from Google,
# and the app must load nothing from outside the machine.
ICON = Path(__file__).parent / "smsops" / "assets" / "icon.svg"
st.set_page_config(page_title="smsops", page_icon=str(ICON), layout="wide")

# The language: a person's choice in the sidebar, else SMSOPS_LANGUAGE, else the browser's.
choices = {"": None, "ru": "Русский", "en": "English"}
person = st.sidebar.selectbox(
    "Язык / Language",
    list(choices),
    format_func=lambda code: choices[code] or "Авто / Auto",
    key="language",
)
st.session_state["_language"] = i18n.choose(st.context.locale, person=person or None)
i18n.use(st.session_state["_language"])
i18n.fall_back_on(lambda: st.session_state.get("_language"))  # fragment reruns have no context

navigation = st.navigation(
    [
        st.Page("pages/overview.py", title=_("Overview"), icon=":material/monitoring:", default=True),
        st.Page("pages/contacts.py", title=_("Contacts"), icon=":material/contacts:"),
        st.Page("pages/segments.py", title=_("Segments"), icon=":material/filter_alt:"),
        st.Page("pages/compose.py", title=_("Compose"), icon=":material/edit_note:"),
        st.Page("pages/campaigns.py", title=_("Campaigns"), icon=":material/campaign:"),
        st.Page("pages/results.py", title=_("Results"), icon=":material/insights:"),
    ]
)
navigation.run()
