"""Contacts: find a contact and see their card, or import a CRM export."""

import streamlit as st

from smsops import contacts, importer, phones, warehouse

st.title("Contacts")
find_tab, import_tab = st.tabs(["Find a contact", "Import a file"])


# --- Find -------------------------------------------------------------------------------


def find() -> None:
    """Search, the result as a table and a CSV, and the chosen contact's card."""
    left, right = st.columns([3, 1])
    text = left.text_input("Search", key="contact_search", placeholder="Name, phone number or CRM id")
    reveal = right.toggle("Reveal phone numbers", key="reveal_numbers", help="Numbers are masked by default")
    results = contacts.search(text, reveal=reveal)
    st.caption(
        f"{len(results):,} contact(s)" + (" (the newest 100)" if not text and len(results) == 100 else "")
    )
    st.dataframe(
        contacts.shown(results.drop(columns=["contact_id"])),
        hide_index=True,
        width="stretch",
        column_config={
            "phone_valid": st.column_config.CheckboxColumn("Can get SMS"),
            "created_at": st.column_config.TextColumn("Added (UTC)"),
        },
    )
    st.download_button(
        "Export these contacts (CSV)",
        contacts.export_csv(results.drop(columns=["contact_id"])),
        file_name="contacts.csv",
        mime="text/csv",
        key="export_contacts",
    )

    if not results.empty:
        labels = dict(zip(results["contact_id"], results["name"] + " · " + results["phone"], strict=True))
        chosen = st.selectbox("Open a contact", list(labels), format_func=labels.get, key="contact_pick")
        card = contacts.card(chosen)
        st.subheader(card.name)
        shown_number = card.phone_e164 if reveal else phones.mask(card.phone_e164)
        c1, c2, c3 = st.columns(3)
        number = (shown_number or contacts.MISSING).replace("*", "\\*")  # stars, not Markdown emphasis
        c1.metric("Number", number)
        c2.metric("Marketing", contacts.consent_label(card.marketing))
        c3.metric("Messages", f"{len(card.messages):,}")
        if not card.fields["phone_valid"]:
            st.warning(f"This number cannot receive SMS: {card.fields['phone_reason'] or 'unknown reason'}.")

        details, history, messages = st.tabs(["Details", "Consent history", "Messages and replies"])
        with details:
            shown = {
                k: v for k, v in card.fields.items() if v not in (None, "") and not k.startswith("phone")
            }
            st.json({**shown, **({"attributes": card.attributes} if card.attributes else {})})
        with history:
            if card.consent_history.empty:
                st.info("No consent events for this number: it can get service messages, not promotions.")
            else:
                st.dataframe(
                    contacts.shown(
                        card.consent_history.drop(columns=["phone_e164", "event_id"], errors="ignore")
                    ),
                    hide_index=True,
                    width="stretch",
                )
        with messages:
            st.dataframe(
                contacts.shown(card.messages.drop(columns=["message_id"])), hide_index=True, width="stretch"
            )
            if not card.replies.empty:
                st.dataframe(contacts.shown(card.replies), hide_index=True, width="stretch")

        with st.form("opt_out_form", clear_on_submit=True):
            st.markdown("**Opt this number out**")
            reason = st.text_input(
                "Reason", key="opt_out_reason", placeholder="e.g. asked by phone on 12 March"
            )
            purposes = st.multiselect(
                "From", ["marketing", "service"], default=["marketing"], key="opt_out_purposes"
            )
            by = st.text_input("Recorded by", key="opt_out_by")
            if st.form_submit_button("Record opt-out"):
                try:
                    written = contacts.opt_out(
                        chosen, reason=reason, requested_by=by or "staff", purposes=tuple(purposes)
                    )
                except ValueError as exc:
                    st.error(str(exc))
                else:
                    st.success(
                        f"Opt-out recorded ({written} event(s)); it applies to every send from now on."
                    )


# --- Import -----------------------------------------------------------------------------


@st.cache_data(ttl=120, show_spinner="Checking the file…", max_entries=8)
def check(path: str, options: importer.Options, imports_done: int):
    """A dry run of the import, cached per file and settings (and redone after an import)."""
    return importer.run_with_rejects(path, options, dry_run=True)


@st.dialog("Import contacts")
def confirm_import(path: str, options: importer.Options, expected: int) -> None:
    st.write(f"Write **{expected:,}** new or updated contacts into the store? Rejected rows are not written.")
    if st.button("Import", type="primary", key="import_confirmed"):
        with st.spinner("Importing…"):
            st.session_state["import_result"] = importer.run_with_rejects(path, options)
            st.session_state["imports_done"] = st.session_state.get("imports_done", 0) + 1
        st.rerun()


def import_file() -> None:
    """Upload, map the columns, check (a dry run), confirm and import; then the outcome."""
    upload = st.file_uploader(
        "A CSV export from your CRM (UTF-8 or Windows-1251; comma, semicolon or tab)",
        type=["csv", "txt", "tsv"],
        key="import_upload",
    )
    if upload is not None:
        path = importer.save_upload(upload.name, upload.getvalue())
        try:
            fmt = importer.sniff(path)
        except importer.ImportFailed as exc:
            st.error(str(exc))
            return
        st.caption(f"Read as {fmt.encoding}, delimiter {fmt.delimiter!r}, {len(fmt.header)} columns.")

        st.markdown("**Columns**: check what each column holds.")
        choices = [*importer.FIELDS, "attribute", "ignore"]
        mapping = {}
        columns = st.columns(min(4, len(fmt.header)))
        for i, name in enumerate(fmt.header):
            mapping[name] = columns[i % len(columns)].selectbox(
                name or f"(column {i + 1})", choices, index=choices.index(fmt.mapping[name]), key=f"map_{i}"
            )

        declared = st.checkbox(
            "These people agreed to receive marketing SMS from us", key="consent_declared",
            help="Without a declared basis, imported contacts get service messages only.",
        )  # fmt: skip
        source = proof = None
        if declared:
            source = st.text_input(
                "Where they agreed", key="consent_source", placeholder="signup form on our site"
            )
            proof = st.text_input(
                "Where the proof is kept", key="consent_proof", placeholder="form URL or document"
            )
        options = importer.Options(
            mapping=mapping, consent_source=source or None, consent_proof=proof or None
        )

        try:
            preview, preview_rejects = check(str(path), options, st.session_state.get("imports_done", 0))
        except importer.ImportFailed as exc:
            st.error(str(exc))
            return
        p1, p2, p3, p4 = st.columns(4)
        p1.metric("New", f"{preview.new:,}")
        p2.metric("Updated", f"{preview.updated:,}")
        p3.metric("Unchanged", f"{preview.unchanged:,}")
        p4.metric("Rejected", f"{preview.rejected_total:,}")
        if preview.rejected:
            st.table({importer.REASON_TEXT.get(r, r): n for r, n in preview.rejected.items()})
            st.download_button(
                "Rejected rows with reasons (CSV)",
                preview_rejects,
                "rejects.csv",
                "text/csv",
                key="preview_rejects",
            )
        if preview.already_imported:
            st.info(
                "This file was imported before with the same settings: importing it again changes nothing."
            )

        if preview.new + preview.updated and st.button(
            f"Import {preview.new + preview.updated:,} contacts", type="primary", key="import_start"
        ):
            confirm_import(str(path), options, preview.new + preview.updated)

    if "import_result" in st.session_state:
        result, rejects = st.session_state["import_result"]
        st.success(
            f"Imported {result.file_name}: {result.new:,} new, {result.updated:,} updated, "
            f"{result.unchanged:,} unchanged, {result.rejected_total:,} rejected."
        )
        if result.rejected_total:
            st.download_button(
                "Rejected rows with reasons (CSV)", rejects, "rejects.csv", "text/csv", key="rejects"
            )
        if warehouse.build_running():
            st.info(
                "The warehouse is being rebuilt; segments and the Overview will include these contacts after it."
            )
        elif st.button("Rebuild the warehouse now", key="rebuild"):
            warehouse.build_in_background()
            st.info("Build started; the pages switch to it when it finishes.")


# The Import tab is drawn first: whatever the Find tab meets (a damaged store, a bad row), the
# way to bring contacts in stays on screen. Neither tab calls st.stop(), which would end both.
with import_tab:
    import_file()
with find_tab:
    find()
