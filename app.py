"""smsops: the Streamlit entry point. Navigation and page config, nothing else."""

import streamlit as st

st.set_page_config(page_title="smsops", page_icon=":material/sms:", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/overview.py", title="Overview", icon=":material/monitoring:", default=True),
        st.Page("pages/contacts.py", title="Contacts", icon=":material/contacts:"),
        st.Page("pages/segments.py", title="Segments", icon=":material/filter_alt:"),
        st.Page("pages/compose.py", title="Compose", icon=":material/edit_note:"),
        st.Page("pages/campaigns.py", title="Campaigns", icon=":material/campaign:"),
        st.Page("pages/results.py", title="Results", icon=":material/insights:"),
    ]
)
navigation.run()
