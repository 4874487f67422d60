"""mtmm-report: figures and a self-contained report of a run or a sweep."""
