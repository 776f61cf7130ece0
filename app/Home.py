"""mlx-steer lab: `streamlit run app/Home.py` (make app serves it on 127.0.0.1)."""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/Home.py` puts app/ itself on sys.path, where state.py and ui.py
# would shadow any top-level module of those names: the pages import the package
# `app` (app.state, app.ui), so its parent goes on sys.path instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import streamlit as st  # noqa: E402

from app import state  # noqa: E402

st.set_page_config(page_title="mlx-steer lab", page_icon=":material/explore:", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
    st.Page("app_pages/concept_creator.py", title="Concept creator", icon=":material/palette:"),
    st.Page("app_pages/playground.py", title="Playground", icon=":material/sports_esports:"),
    st.Page("app_pages/visualizer.py", title="Visualizer", icon=":material/biotech:"),
    st.Page("app_pages/experiments.py", title="Experiments", icon=":material/science:"),
    st.Page("app_pages/introspection.py", title="Introspection", icon=":material/psychology:"),
    st.Page("app_pages/library.py", title="Library", icon=":material/library_books:"),
]

page = st.navigation(PAGES)
state.model_picker()
state.sidebar_model_info(state.lab())
page.run()
