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
