"""Renders of maps and arrays, nothing more: CircuitsVis views and the offline page (``views``,
``page``) and matplotlib plots (``plots``). No module here runs a model; ``tl_normmix.reports``
builds the pages the command line writes."""
