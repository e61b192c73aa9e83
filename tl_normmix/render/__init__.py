"""Renders of maps: CircuitsVis views and the offline page (``views``, ``page``), matplotlib
plots (``plots``) and the self-contained HTML report (``report``)."""
