"""Tools every AutoCode run has unless the tools file sets INCLUDE_BUILTINS = False."""

from __future__ import annotations

from tools.declarations import LLM_HELPER, Tool, tool_from_dict

GEOCODE_CODE = '''
def geocode(address: str) -> dict | None:
    """Latitude/longitude of an address or place name via OpenStreetMap Nominatim, or None if unknown."""
    import os
    from urllib.parse import urlsplit
    from geopy.geocoders import Nominatim

    url = urlsplit(os.environ.get("AUTOCODE_NOMINATIM_URL") or "https://nominatim.openstreetmap.org")
    geocoder = Nominatim(user_agent="autocode-agent", domain=url.netloc + url.path.rstrip("/"),
                         scheme=url.scheme or "https", timeout=20)
    place = geocoder.geocode(address)
    if place is None:
        return None
    return {"address": place.address, "latitude": place.latitude, "longitude": place.longitude}
'''

BUILTIN_SPECS = [
    {"lib_name": ["numpy"]},
    # Data tools (issue 13). Imported by the steps that use them, never preloaded: a worker starts without them.
    {
        "lib_name": ["pandas"],
        "instructions": "Tables: the user's files are under inputs/ (read-only), e.g. "
        "pd.read_csv('inputs/sales.csv'); return small summaries, not whole tables.",
        "code_example": "import pandas as pd\ndf = pd.read_csv('inputs/sales.csv')\ntotals = df.groupby('region')"
        "['amount'].sum().to_dict()",
    },
    {
        "lib_name": ["matplotlib"],
        "instructions": "Charts: use the Agg backend and save PNGs under outputs/ (they are sent to the user).",
        "code_example": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\nax.bar(names, values)\nfig.savefig('outputs/chart.png', dpi=100)",
    },
    {
        "lib_name": ["openpyxl"],
        "instructions": "Excel files under inputs/: pd.read_excel('inputs/book.xlsx', sheet_name=None) (openpyxl "
        "engine), or openpyxl.load_workbook(path, read_only=True); write .xlsx results under outputs/.",
    },
    {
        "lib_name": ["geopy"],
        "instructions": "Distances between coordinates with geopy.distance.geodesic(a, b).km. "
        "To turn addresses into coordinates call geocode(address), never a geocoder directly.",
        "code_example": "from geopy.distance import geodesic\nkm = geodesic((48.85, 2.35), (51.51, -0.13)).km",
    },
    {
        "lib_names": ["geopy"],
        "instructions": "Coordinates of an address: {address, latitude, longitude} or None. Call it at most once "
        "per address.",
        "use_exactly_code_example": True,
        "code_example": GEOCODE_CODE.strip(),
    },
]


def builtin_tools() -> list[Tool]:
    return [*(tool_from_dict(spec, f"built-in tool {i}") for i, spec in enumerate(BUILTIN_SPECS)), LLM_HELPER]
