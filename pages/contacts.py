"""Contacts: find a contact and see their card, or import a CRM export."""

import time

import pandas as pd
import streamlit as st

from smsops import config, contacts, i18n, importer, phones, warehouse
from smsops.i18n import _, ngettext

st.title(_("Contacts"))
find_tab, import_tab = st.tabs([_("Find a contact"), _("Import a file")])


def table(frame, **column_config) -> None:
    """A frame of smsops.contacts in the person's language, its columns named."""
    shown = contacts.shown(frame)
    headers = {c: _(contacts.HEADERS[c]) for c in shown.columns if c in contacts.HEADERS}
    st.dataframe(shown, hide_index=True, width="stretch", column_config=headers | column_config)


# --- Find -------------------------------------------------------------------------------


def find() -> None:
    """Search, the result as a table and a CSV, and the chosen contact's card."""
    left, right = st.columns([3, 1])
    text = left.text_input(_("Search"), key="contact_search", placeholder=_("Name, phone number or CRM id"))
    reveal = right.toggle(
        _("Reveal phone numbers"), key="reveal_numbers", help=_("Numbers are masked by default")
    )
    results = contacts.search(text, reveal=reveal)
    found = ngettext("{n} contact", "{n} contacts", len(results)).format(n=i18n.number(len(results)))
    st.caption(found + (" " + _("(the newest 100)") if not text and len(results) == 100 else ""))
    table(
        results.drop(columns=["contact_id"]),
        phone_valid=st.column_config.CheckboxColumn(_(contacts.HEADERS["phone_valid"])),
    )
    st.download_button(
        _("Export these contacts (CSV)"),
        contacts.export_csv(results.drop(columns=["contact_id"])),
        file_name="contacts.csv",
        mime="text/csv",
        key="export_contacts",
    )

    if not results.empty:
        labels = dict(zip(results["contact_id"], results["name"] + " · " + results["phone"], strict=True))
        chosen = st.selectbox(_("Open a contact"), list(labels), format_func=labels.get, key="contact_pick")
        card = contacts.card(chosen)
        st.subheader(card.name)
        shown_number = card.phone_e164 if reveal else phones.mask(card.phone_e164)
        c1, c2, c3 = st.columns(3)
        number = (shown_number or contacts.MISSING).replace("*", "\\*")  # stars, not Markdown emphasis
        c1.metric(_("Number"), number)
        c2.metric(_("Marketing"), contacts.consent_label(card.marketing))
        c3.metric(_("Messages"), i18n.number(len(card.messages)))
        if not card.fields["phone_valid"]:
            st.warning(
                _("This number cannot receive SMS: {reason}.").format(reason=contacts.unusable_reason(card))
            )

        details, history, messages = st.tabs([_("Details"), _("Consent history"), _("Messages and replies")])
        with details:
            table(contacts.details(card))
        with history:
            if card.consent_history.empty:
                st.info(_("No consent events for this number: it can get service messages, not promotions."))
            else:
                internal = ["phone_e164", "event_id", "event_key", "contact_id"]
                table(card.consent_history.drop(columns=internal, errors="ignore"))
        with messages:
            if card.messages.empty:
                st.caption(_("No messages to this contact yet."))
            else:
                table(card.messages.drop(columns=["message_id"]))
            if not card.replies.empty:
                st.markdown("**" + _("Replies") + "**")
                table(card.replies)

        with st.form("opt_out_form", clear_on_submit=True):
            st.markdown("**" + _("Opt this number out") + "**")
            reason = st.text_input(
                _("Reason"), key="opt_out_reason", placeholder=_("e.g. asked by phone on 12 March")
            )
            purposes_shown = {p: i18n.label(contacts.PURPOSE_LABELS, p) for p in ("marketing", "service")}
            purposes = st.multiselect(
                _("Opt out of"),
                list(purposes_shown),
                default=["marketing"],
                format_func=purposes_shown.get,
                key="opt_out_purposes",
            )
            by = st.text_input(_("Recorded by"), key="opt_out_by")
            if st.form_submit_button(_("Record opt-out")):
                try:
                    written = contacts.opt_out(
                        chosen, reason=reason, requested_by=by or "staff", purposes=tuple(purposes)
                    )
                except ValueError as exc:
                    st.error(str(exc))
                else:
                    st.success(
                        ngettext(
                            "Opt-out recorded ({n} event); it applies to every send from now on.",
                            "Opt-out recorded ({n} events); it applies to every send from now on.",
                            written,
                        ).format(n=i18n.number(written))
                    )


# --- Import -----------------------------------------------------------------------------


@st.cache_data(ttl=120, show_spinner=_("Checking the file…"), max_entries=8)
def check(path: str, options: importer.Options, imports_done: int):
    """A dry run of the import, cached per file and settings (and redone after an import)."""
    return importer.run_with_rejects(path, options, dry_run=True)


def forget_confirming() -> None:
    st.session_state.pop("import_confirming", None)


@st.dialog(_("Import contacts"), on_dismiss=forget_confirming)
def confirm_import(path: str, options: importer.Options, expected: int) -> None:
    if expected:
        st.write(
            ngettext(
                "Write **{n}** new or updated contact into the store? Rejected rows are not written.",
                "Write **{n}** new or updated contacts into the store? Rejected rows are not written.",
                expected,
            ).format(n=i18n.number(expected))
        )
    else:
        st.write(_("Record the marketing consent of this file's numbers? The contacts stay as they are."))
    if st.button(_("Import"), type="primary", key="import_confirmed"):
        with st.spinner(_("Importing…")):
            try:
                result, rejects = importer.run_with_rejects(path, options)
            except importer.ImportFailed as exc:
                st.error(exc.translated())
                return
        forget_confirming()
        # the marts include the new contacts only after a build: start one now (after any build
        # already running, which may have read the store before this import)
        st.session_state["last_import"] = {
            "key": (path, options.as_json()),
            "result": result,
            "rejects": rejects,
            "consent": options.consent_source is not None,
            "build": warehouse.build_in_background(wait=True),
            "started": time.monotonic(),
        }
        st.session_state["imports_done"] = st.session_state.get("imports_done", 0) + 1
        st.rerun()


def explain_consent() -> tuple[bool, str | None, str | None]:
    """The consent choice, with what it means: whether the people in the file agreed to
    promotions, where, and where the proof is kept."""
    with st.container(border=True):
        declared = st.checkbox(
            _("These people agreed to receive marketing SMS from us"), key="consent_declared"
        )
        st.caption(
            _(
                "Tick this only if everyone in the file agreed to get promotional messages from you "
                "(for example, a ticked box on a signup form or a signed loyalty card form). "
                "Without it, the imported contacts get service messages only (order status, payment "
                "reminders, sign-in codes) and are left out of promotions. With it, each number gets a "
                "marketing opt-in in the consent ledger; where they agreed and where the proof is kept "
                "are stored with it, along with this file's name and checksum, as the evidence the law "
                "on advertising (38-FZ, article 18) asks of the sender. An opt-out recorded later always "
                "wins over an import."
            )
        )
        if not declared:
            return False, None, None
        source = st.text_input(
            _("Where they agreed"), key="consent_source", placeholder=_("signup form on our site")
        )
        proof = st.text_input(
            _("Where the proof is kept"), key="consent_proof", placeholder=_("form URL or document")
        )
        if not (source or "").strip():
            st.warning(_("Say where they agreed: without it no consent can be recorded."))
        return True, (source or "").strip() or None, (proof or "").strip() or None


def preview(path, options: importer.Options, declared: bool) -> None:
    """What the import would do, and the button that starts it."""
    try:
        result, rejects = check(str(path), options, st.session_state.get("imports_done", 0))
    except importer.ImportFailed as exc:
        st.error(exc.translated())
        return
    p1, p2, p3, p4 = st.columns(4)
    p1.metric(_("New"), i18n.number(result.new))
    p2.metric(_("Updated"), i18n.number(result.updated))
    p3.metric(_("Unchanged"), i18n.number(result.unchanged))
    p4.metric(_("Rejected"), i18n.number(result.rejected_total))
    if result.rejected:
        rejected_rows(result, rejects, key="preview_rejects")
    if result.already_imported:
        st.info(
            _("This file was imported before with the same settings: importing it again changes nothing.")
        )
        return
    if options.consent_source:
        st.caption(consent_outcome(result, will=True))
    elif not declared:
        st.caption(_("No marketing consent declared: these contacts will get service messages only."))
    writes = result.new + result.updated
    consent_only = not writes and options.consent_source is not None and result.consent_recorded > 0
    if declared and options.consent_source is None:
        return  # the warning above says what is missing
    if writes:
        start = ngettext("Import {n} contact", "Import {n} contacts", writes).format(n=i18n.number(writes))
    elif consent_only:
        start = ngettext(
            "Record marketing consent for {n} number", "Record marketing consent for {n} numbers",
            result.consent_recorded,
        ).format(n=i18n.number(result.consent_recorded))  # fmt: skip
    else:
        return
    # the dialog stays open across reruns until it is confirmed or dismissed
    if st.button(start, type="primary", key="import_start"):
        st.session_state["import_confirming"] = (str(path), options)
    if st.session_state.get("import_confirming") == (str(path), options):
        confirm_import(str(path), options, writes)


def consent_outcome(result: importer.Result, *, will: bool) -> str:
    """How many numbers get (or got) a marketing opt-in, and how many an opt-out kept out."""
    n, skipped = result.consent_recorded, result.consent_skipped_opted_out
    if will:
        text = ngettext(
            "Marketing consent will be recorded for {n} number.",
            "Marketing consent will be recorded for {n} numbers.",
            n,
        ).format(n=i18n.number(n))
    else:
        text = ngettext(
            "Marketing consent recorded for {n} number.", "Marketing consent recorded for {n} numbers.", n
        ).format(n=i18n.number(n))
    if skipped:
        text += " " + ngettext(
            "{n} number opted out before: an import never overrides an opt-out.",
            "{n} numbers opted out before: an import never overrides an opt-out.",
            skipped,
        ).format(n=i18n.number(skipped))
    return text


def rejected_rows(result: importer.Result, rejects: bytes, key: str) -> None:
    """Rejected rows by reason, and all of them with their reasons as a CSV."""
    st.table(
        pd.DataFrame(
            [(importer.explain(reason), i18n.number(n)) for reason, n in result.rejected.items()],
            columns=[_("Why rejected"), _("Rows")],
        ),
        hide_index=True,
    )
    st.download_button(_("Rejected rows with reasons (CSV)"), rejects, "rejects.csv", "text/csv", key=key)


def follow_import(last: dict) -> None:
    """The import just done, and the warehouse build that brings its contacts to segments."""
    result = last["result"]
    st.success(
        _(
            "Imported {file}: {new} new, {updated} updated, {unchanged} unchanged, {rejected} rejected."
        ).format(
            file=result.file_name,
            new=i18n.number(result.new),
            updated=i18n.number(result.updated),
            unchanged=i18n.number(result.unchanged),
            rejected=i18n.number(result.rejected_total),
        )
    )
    if last["consent"]:
        st.write(consent_outcome(result, will=False))
    else:
        st.write(_("No marketing consent was declared: these contacts get service messages only."))
    if result.rejected_total:
        rejected_rows(result, last["rejects"], key="rejects")
    build = last["build"]

    @st.fragment(run_every=2 if build.poll() is None else None)
    def build_status() -> None:
        """While the build runs: its progress, re-checked every 2 s without rerunning the page.
        When it ends: when the new contacts can be targeted (or why not)."""
        code = build.poll()
        if code is None:
            elapsed = time.monotonic() - last["started"]
            previous = warehouse.current()
            # not a `with` block: leaving one marks the status complete while the build still runs
            status = st.status(_("Rebuilding the warehouse with the new contacts…"), expanded=True)
            if previous is not None:
                status.progress(
                    min(elapsed / max(previous.seconds, 1.0), 0.95),
                    text=_("{elapsed} s so far; the last build took {seconds} s").format(
                        elapsed=i18n.number(round(elapsed)), seconds=i18n.number(round(previous.seconds))
                    ),
                )
            else:  # the first build of this install: nothing to measure it against
                status.caption(_("{elapsed} s so far").format(elapsed=i18n.number(round(elapsed))))
            status.write(
                _(
                    "The new contacts can be targeted in segments and campaigns when this build is "
                    "published. The rest of the app stays usable meanwhile."
                )
            )
            return
        if not last.get("ended"):  # the build ended since the page last ran: stop polling
            last["ended"] = True
            st.rerun(scope="app")
        if code == 0:
            snapshot = warehouse.current()
            st.success(
                _(
                    "The new contacts can be targeted now: the warehouse build that includes them was "
                    "published at {time}."
                ).format(time=i18n.datetime_(snapshot.built_at, tz=config.time_zone()))
            )
        else:
            log = config.paths().dbt_artifacts / "background-build.log"
            st.error(
                _(
                    "The warehouse build failed (exit {code}): the contacts are stored, but segments do "
                    "not include them yet. See {log}."
                ).format(code=code, log=log)
            )
            if st.button(_("Rebuild the warehouse now"), key="rebuild"):
                last.update(
                    build=warehouse.build_in_background(wait=True), started=time.monotonic(), ended=False
                )
                st.rerun(scope="app")

    build_status()


def import_file() -> None:
    """Upload, map the columns, declare consent, check (a dry run), confirm and import; then the
    outcome and the build that brings the contacts to segments."""
    upload = st.file_uploader(
        _("A CSV export from your CRM (UTF-8 or Windows-1251; comma, semicolon or tab)"),
        type=["csv", "txt", "tsv"],
        key="import_upload",
    )
    last = st.session_state.get("last_import")
    if upload is None:
        if last is not None:
            follow_import(last)
        return
    path = importer.save_upload(upload.name, upload.getvalue())
    try:
        fmt = importer.sniff(path)
    except importer.ImportFailed as exc:
        st.error(exc.translated())
        return
    st.caption(
        ngettext(
            "Read as {encoding}, separated by {delimiter}, {n} column.",
            "Read as {encoding}, separated by {delimiter}, {n} columns.",
            len(fmt.header),
        ).format(
            encoding=importer.ENCODING_LABELS.get(fmt.encoding, fmt.encoding),
            delimiter=i18n.label(importer.DELIMITER_LABELS, fmt.delimiter),
            n=i18n.number(len(fmt.header)),
        )
    )

    st.markdown(_("**Columns**: check what each column holds."))
    choices = [*importer.FIELDS, "attribute", "ignore"]
    targets = {target: i18n.label(importer.TARGET_LABELS, target) for target in choices}
    mapping = {}
    columns = st.columns(min(4, len(fmt.header)))
    for i, name in enumerate(fmt.header):
        mapping[name] = columns[i % len(columns)].selectbox(
            name or _("(column {n})").format(n=i + 1),
            choices,
            index=choices.index(fmt.mapping[name]),
            format_func=targets.get,
            key=f"map_{i}",
        )

    declared, source, proof = explain_consent()
    options = importer.Options(mapping=mapping, consent_source=source, consent_proof=proof)
    if last is not None and last["key"] == (str(path), options.as_json()):
        follow_import(last)  # this file, as just imported: its outcome, not a new dry run
    else:
        preview(path, options, declared)


# The Import tab is drawn first: whatever the Find tab meets (a damaged store, a bad row), the
# way to bring contacts in stays on screen. Neither tab calls st.stop(), which would end both.
with import_tab:
    import_file()
with find_tab:
    find()
