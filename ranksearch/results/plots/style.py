"""What the two backends draw alike: font size, colours, plotly's HTML options."""

FONT_SIZE = 12
COLORS = {
    "trial": "#6baed6",
    "front": "#e6550d",
    "infeasible": "#cb181d",
    "baseline": "#252525",
    "anchor": "#6a51a3",
    "budget": "#737373",
}
HTML_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"scale": 2}}
