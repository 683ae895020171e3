"""The report's stylesheet, inlined into the page (no external files or fonts)."""

CSS = """
:root { --ink: #1d2430; --muted: #667085; --line: #e4e7ec; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f7; color: var(--ink);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 20px 16px 40px; }
header h1 { font-size: 22px; margin: 0 0 2px; }
header .sub { color: var(--muted); margin: 0 0 14px; word-break: break-all; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 18px 16px; margin: 0 0 16px; }
.pair { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px;
  align-items: start; }
@media (max-width: 820px) { .pair { grid-template-columns: minmax(0, 1fr); gap: 0; } }
section h2 { font-size: 16px; margin: 0 0 4px; }
.src { color: var(--muted); font-size: 12.5px; margin: 0 0 10px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 10px 12px; }
.tile .k { color: var(--muted); font-size: 12px; }
.tile .v { font-size: 20px; font-weight: 600; }
.tile .d { color: var(--muted); font-size: 12px; }
.missing { background: #fff7e6; border: 1px solid #f5c56b; border-radius: 6px;
  padding: 8px 10px; margin: 6px 0; color: #7a4b00; }
.notes { margin: 10px 0 0; padding-left: 18px; color: #7a4b00; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 4px; }
svg.chart { max-width: 100%; height: auto; font-size: 11px; }
svg .ct { font-size: 13px; font-weight: 600; fill: var(--ink); }
svg .grid { stroke: #eceef2; stroke-width: 1; }
svg .frame { fill: none; stroke: #c9ced6; }
svg .yt { text-anchor: end; fill: var(--muted); }
svg .xt { text-anchor: middle; fill: var(--muted); }
svg .xl { text-anchor: end; fill: var(--muted); }
svg .lg, svg .bl { fill: var(--ink); }
svg .na { text-anchor: middle; fill: var(--muted); }
svg .na2 { fill: var(--muted); font-style: italic; }
svg .ln { stroke-width: 2; stroke-linejoin: round; }
svg .iou { fill: var(--accent); }
svg .share { fill: #a8b0bd; }
svg .bv { fill: var(--ink); font-weight: 600; }
svg .sv { fill: var(--muted); font-size: 10.5px; }
table { border-collapse: collapse; }
table.classes td, table.classes th { border-bottom: 1px solid var(--line); padding: 4px 12px 4px 0;
  text-align: left; }
table.classes td.num, table.classes th.num { text-align: right; }
.sw { display: inline-block; width: 14px; height: 14px; border: 1px solid #555;
  vertical-align: -2px; border-radius: 2px; }
table.cm td { width: 46px; height: 34px; text-align: center; font-size: 12px;
  border: 1px solid #fff; }
table.cm th { font-weight: 500; font-size: 12px; padding: 2px 6px; }
table.cm th.row { text-align: right; white-space: nowrap; }
table.cm th.col { vertical-align: bottom; height: 90px; }
table.cm th.col span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; }
img.cmimg { max-width: 100%; height: auto; }
.axis { color: var(--muted); font-size: 12px; }
pre { background: #f6f7f9; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  font-size: 12.5px; overflow: auto; max-height: 520px; margin: 0; }
.gallery { display: grid; grid-template-columns: 130px repeat(4, minmax(0, 165px)); gap: 6px 8px;
  align-items: center; }
.gallery .h { color: var(--muted); font-size: 12px; font-weight: 600; }
.gallery img { width: 100%; height: auto; border-radius: 3px; border: 1px solid var(--line);
  image-rendering: pixelated; }
.gallery img.photo { image-rendering: auto; }
.gallery .stem { font-weight: 600; word-break: break-all; }
.gallery .score { color: var(--muted); font-size: 12.5px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
.legend { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.legend i { display: inline-block; width: 11px; height: 11px; vertical-align: -1px;
  margin: 0 3px 0 8px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""
