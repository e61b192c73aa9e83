"""The orchestration behind the command line: the report of one text, the patching report and
the corpus report (each runs what it needs and hands arrays to ``tl_normmix.render``)."""
