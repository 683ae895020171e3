"""`deeplab report`: one self-contained HTML page showing how a run does.

runfolder.py  reads the run folder, its evaluation output and dataset, leniently
svg.py        line charts and per-class bars as inline SVG
gallery.py    best and worst val images: photo, truth, prediction, error map
sections.py   the page's sections; a missing piece becomes a "missing: ..." note
page.py       summary header, assembly, `write_report`
"""

from segment_deeplab.report.page import Report, build_report, write_report

__all__ = ["Report", "build_report", "write_report"]
