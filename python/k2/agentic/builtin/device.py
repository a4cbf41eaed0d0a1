"""Device settings: radios, levels, Wi-Fi networks and app permissions of a phone."""

from __future__ import annotations

from typing import Any, Literal

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool

Toggle = Literal["wifi", "bluetooth", "airplane_mode", "mobile_data", "do_not_disturb", "location"]
Level = Literal["brightness", "volume"]


@register_domain
class DeviceDomain(Domain):
    name = "device"
    policy = (
        "You are a phone's settings assistant. Change only what the user asks. Airplane mode "
        "turns Wi-Fi, Bluetooth and mobile data off; Wi-Fi cannot be turned on while it is on. "
        "Never reveal saved Wi-Fi passwords."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "settings": {
                "wifi": True, "bluetooth": False, "airplane_mode": False, "mobile_data": True,
                "do_not_disturb": False, "location": True, "brightness": 60, "volume": 40,
            },
            "networks": {
                "HomeNet": {"secured": True, "password": "blue-otter-42", "saved": True, "in_range": True},
                "CafeFree": {"secured": False, "password": "", "saved": False, "in_range": True},
                "Office5G": {"secured": True, "password": "q3-roadmap", "saved": False, "in_range": False},
            },
            "connected": "HomeNet",
            "apps": {
                "maps": {"permissions": ["camera", "location"]},
                "chat": {"permissions": ["camera", "contacts", "microphone"]},
                "flashlight": {"permissions": ["camera", "contacts", "location"]},
            },
        }

    @tool(kind="read")
    def get_settings(self) -> dict[str, Any]:
        """Every toggle and level, and the connected Wi-Fi network."""
        return {**self.state["settings"], "connected_wifi": self.state["connected"]}

    @tool(kind="write")
    def set_toggle(self, setting: Toggle, enabled: bool) -> dict[str, Any]:
        """Turn a setting on or off.

        Args:
            setting: which toggle.
            enabled: on (true) or off (false).
        """
        s = self.state["settings"]
        if enabled and setting in ("wifi", "bluetooth", "mobile_data") and s["airplane_mode"]:
            raise ToolError(f"cannot turn {setting} on while airplane mode is on", "invalid_state")
        s[setting] = enabled
        if setting == "airplane_mode" and enabled:
            s["wifi"] = s["bluetooth"] = s["mobile_data"] = False
        if not s["wifi"]:
            self.state["connected"] = None
        return {setting: enabled}

    @tool(kind="write")
    def set_level(self, setting: Level, value: int) -> dict[str, Any]:
        """Set brightness or volume.

        Args:
            setting: brightness or volume.
            value: 0-100.
        """
        if not 0 <= value <= 100:
            raise ToolError(f"{setting} must be between 0 and 100, not {value}", "invalid_argument")
        self.state["settings"][setting] = value
        return {setting: value}

    @tool(kind="read")
    def scan_wifi(self) -> list[dict[str, Any]]:
        """The Wi-Fi networks in range (needs Wi-Fi on)."""
        if not self.state["settings"]["wifi"]:
            raise ToolError("Wi-Fi is off; turn it on to scan", "invalid_state")
        return [
            {"ssid": ssid, "secured": n["secured"], "saved": n["saved"]}
            for ssid, n in sorted(self.state["networks"].items())
            if n["in_range"]
        ]

    @tool(kind="write")
    def connect_wifi(self, ssid: str, password: str = "") -> dict[str, Any]:
        """Join a Wi-Fi network (a saved one needs no password).

        Args:
            ssid: the network name.
            password: its password, if it is secured and not saved.
        """
        if not self.state["settings"]["wifi"]:
            raise ToolError("Wi-Fi is off", "invalid_state")
        network = self.state["networks"].get(ssid)
        if network is None or not network["in_range"]:
            raise ToolError(f"network {ssid!r} is not in range", "not_found")
        if network["secured"] and not network["saved"] and password != network["password"]:
            raise ToolError(f"wrong password for {ssid}", "auth_failed")
        network["saved"] = True
        self.state["connected"] = ssid
        return {"connected": ssid}

    @tool(kind="write")
    def forget_wifi(self, ssid: str) -> dict[str, Any]:
        """Forget a saved network (disconnecting if connected).

        Args:
            ssid: the network name.
        """
        network = self.state["networks"].get(ssid)
        if network is None or not network["saved"]:
            raise ToolError(f"{ssid!r} is not a saved network", "not_found")
        network["saved"] = False
        if self.state["connected"] == ssid:
            self.state["connected"] = None
        return {"forgotten": ssid}

    @tool(kind="read")
    def list_app_permissions(self, app: str) -> list[str]:
        """The permissions an app holds.

        Args:
            app: the app's name.
        """
        found = self.state["apps"].get(app)
        if found is None:
            raise ToolError(f"no app {app!r}", "not_found")
        return list(found["permissions"])

    @tool(kind="write")
    def revoke_permission(self, app: str, permission: str) -> dict[str, Any]:
        """Take a permission away from an app.

        Args:
            app: the app's name.
            permission: e.g. location.
        """
        found = self.state["apps"].get(app)
        if found is None:
            raise ToolError(f"no app {app!r}", "not_found")
        if permission not in found["permissions"]:
            raise ToolError(f"{app} does not hold {permission}", "not_found")
        found["permissions"].remove(permission)
        return {"app": app, "permissions": found["permissions"]}

    @assertion
    def setting_is(self, setting: str, value: Any) -> bool:
        """Whether a toggle or level has this value."""
        return self.state["settings"].get(setting) == value
