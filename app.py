"""smsops: the Streamlit entry point. Navigation and page config, nothing else."""

import streamlit as st

st.set_page_config(page_title="smsops", page_icon="✉️", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/overview.py", title="Overview", icon="📊", default=True),
        st.Page("pages/contacts.py", title="Contacts", icon="👥"),
        st.Page("pages/segments.py", title="Segments", icon="🎯"),
        st.Page("pages/compose.py", title="Compose", icon="✍️"),
    ]
)
navigation.run()
