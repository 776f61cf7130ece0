"""The Streamlit lab (`streamlit run app/Home.py`): a package, so its helpers are
`app.state` (the one model, its lock, the model picker), `app.ui` (shared widgets and
renderers) and `app.uploads`; the pages in `app_pages/` hold layout and calls only."""
