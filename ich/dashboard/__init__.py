"""The Streamlit dashboard, one module per page (``upload_page``, ``worklist_page``, ``viewer_page``), with
``navigation`` between them, ``resources`` (model, store, volumes: cached per server) and ``session``
(sign-in, audit). ``streamlit_app.py`` is its entry point. What it shows as text, tables and figures is
:mod:`ich.presentation`, which needs no Streamlit. Not a medical device.

Functions ending in ``_ui`` draw widgets and return their values; ``page()`` of each page module wires
them to the store. Importing this package imports Streamlit; ``ich`` itself does not.
"""
