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
    # Data tools (issue 13), imported by the steps that use them (never preloaded: a worker starts without them).
    # No guide text: the files manifest says where inputs are and the system prompt where outputs go, and the
    # sandbox sets MPLBACKEND=Agg, so each planner request stays as small as before.
    {"lib_name": ["pandas"]},
    {"lib_name": ["matplotlib"]},
    {"lib_name": ["openpyxl"]},
    {
        "lib_name": ["geopy"],
        "instructions": "Distances: geopy.distance.geodesic((lat, lon), (lat, lon)).km. Addresses to coordinates "
        "only through geocode(address), never a geocoder directly.",
    },
    {
        "lib_names": ["geopy"],
        "instructions": "Returns {address, latitude, longitude} or None; call it at most once per address.",
        "use_exactly_code_example": True,
        "code_example": GEOCODE_CODE.strip(),
    },
]


def builtin_tools() -> list[Tool]:
    return [*(tool_from_dict(spec, f"built-in tool {i}") for i, spec in enumerate(BUILTIN_SPECS)), LLM_HELPER]
