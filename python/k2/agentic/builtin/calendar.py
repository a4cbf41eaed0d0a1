"""Calendar: events with times and attendees; bookings that overlap conflict."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool

FORMAT = "%Y-%m-%d %H:%M"


def _time(value: str, field: str) -> datetime:
    try:
        return datetime.strptime(value, FORMAT)
    except ValueError:
        raise ToolError(f"{field} {value!r} is not a time in the form YYYY-MM-DD HH:MM", "invalid_argument") from None


@register_domain
class CalendarDomain(Domain):
    name = "calendar"
    policy = (
        "You manage the user's calendar. Times are local, written YYYY-MM-DD HH:MM. Never "
        "double-book: if a new or moved event overlaps another, tell the user and propose a free "
        "slot instead. Confirm the title and time before creating or moving an event."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "owner": "sam@example.com",
            "next_id": 5,
            "events": {
                "ev1": {"title": "Team standup", "start": "2025-03-10 09:00", "end": "2025-03-10 09:15",
                        "attendees": ["ana@example.com", "raj@example.com"], "location": "Room 2"},
                "ev2": {"title": "Dentist", "start": "2025-03-10 14:00", "end": "2025-03-10 15:00",
                        "attendees": [], "location": "Main St 4"},
                "ev3": {"title": "1:1 with Ana", "start": "2025-03-11 10:00", "end": "2025-03-11 10:30",
                        "attendees": ["ana@example.com"], "location": ""},
                "ev4": {"title": "Quarterly review", "start": "2025-03-12 13:00", "end": "2025-03-12 15:00",
                        "attendees": ["ana@example.com", "raj@example.com", "lee@example.com"], "location": "Room 1"},
            },
        }

    def _event(self, event_id: str) -> dict[str, Any]:
        found = self.state["events"].get(event_id)
        if found is None:
            raise ToolError(f"no event with id {event_id}", "not_found")
        return found

    def _check_slot(self, start: str, end: str, ignore: str | None = None) -> None:
        begin, finish = _time(start, "start"), _time(end, "end")
        if finish <= begin:
            raise ToolError(f"end {end} is not after start {start}", "invalid_argument")
        for eid, ev in sorted(self.state["events"].items()):
            if eid == ignore:
                continue
            if _time(ev["start"], "start") < finish and begin < _time(ev["end"], "end"):
                raise ToolError(
                    f"{start}–{end} conflicts with {eid} '{ev['title']}' ({ev['start']}–{ev['end']})",
                    "conflict",
                )

    @tool(kind="read")
    def list_events(self, date: str) -> list[dict[str, Any]]:
        """List the events on a day, earliest first.

        Args:
            date: the day, YYYY-MM-DD.
        """
        _time(date + " 00:00", "date")
        return [
            {"id": eid, **ev}
            for eid, ev in sorted(self.state["events"].items(), key=lambda kv: kv[1]["start"])
            if ev["start"].startswith(date)
        ]

    @tool(kind="read")
    def get_event(self, event_id: str) -> dict[str, Any]:
        """Get one event.

        Args:
            event_id: the event's id, e.g. ev3.
        """
        return {"id": event_id, **self._event(event_id)}

    @tool(kind="read")
    def find_free_slot(self, date: str, duration_minutes: int, earliest: str = "09:00", latest: str = "18:00") -> dict[str, Any]:
        """Find the first free slot of a given length on a day.

        Args:
            date: the day, YYYY-MM-DD.
            duration_minutes: how long the slot must be.
            earliest: the earliest start, HH:MM.
            latest: the latest end, HH:MM.
        """
        if duration_minutes <= 0:
            raise ToolError("duration_minutes must be positive", "invalid_argument")
        begin = _time(f"{date} {earliest}", "earliest")
        stop = _time(f"{date} {latest}", "latest")
        step = timedelta(minutes=15)
        length = timedelta(minutes=duration_minutes)
        while begin + length <= stop:
            start, end = begin.strftime(FORMAT), (begin + length).strftime(FORMAT)
            try:
                self._check_slot(start, end)
                return {"start": start, "end": end}
            except ToolError:
                begin += step
        raise ToolError(f"no free {duration_minutes}-minute slot on {date} between {earliest} and {latest}", "no_slot")

    @tool(kind="write")
    def create_event(self, title: str, start: str, end: str, attendees: list[str] | None = None, location: str = "") -> dict[str, Any]:
        """Create an event; fails if it overlaps another.

        Args:
            title: what the event is.
            start: start time, YYYY-MM-DD HH:MM.
            end: end time, YYYY-MM-DD HH:MM.
            attendees: email addresses to invite.
            location: where it happens.
        """
        if not title.strip():
            raise ToolError("title must not be empty", "invalid_argument")
        self._check_slot(start, end)
        for email in attendees or []:
            if "@" not in email:
                raise ToolError(f"attendee {email!r} is not an email address", "invalid_argument")
        event_id = f"ev{self.state['next_id']}"
        self.state["next_id"] += 1
        self.state["events"][event_id] = {
            "title": title, "start": start, "end": end, "attendees": sorted(attendees or []), "location": location,
        }
        return {"id": event_id, **self.state["events"][event_id]}

    @tool(kind="write")
    def move_event(self, event_id: str, start: str, end: str) -> dict[str, Any]:
        """Move an event to a new time; fails if the new time overlaps another event.

        Args:
            event_id: the event's id.
            start: new start, YYYY-MM-DD HH:MM.
            end: new end, YYYY-MM-DD HH:MM.
        """
        event = self._event(event_id)
        self._check_slot(start, end, ignore=event_id)
        event["start"], event["end"] = start, end
        return {"id": event_id, **event}

    @tool(kind="write")
    def cancel_event(self, event_id: str) -> dict[str, Any]:
        """Cancel (delete) an event.

        Args:
            event_id: the event's id.
        """
        event = self._event(event_id)
        del self.state["events"][event_id]
        return {"cancelled": event_id, "title": event["title"]}

    @tool(kind="write")
    def add_attendee(self, event_id: str, email: str) -> dict[str, Any]:
        """Invite one more person to an event.

        Args:
            event_id: the event's id.
            email: their email address.
        """
        event = self._event(event_id)
        if "@" not in email:
            raise ToolError(f"{email!r} is not an email address", "invalid_argument")
        if email in event["attendees"]:
            raise ToolError(f"{email} is already invited to {event_id}", "already_exists")
        event["attendees"] = sorted([*event["attendees"], email])
        return {"id": event_id, "attendees": event["attendees"]}

    @assertion
    def event_at(self, title: str, start: str) -> bool:
        """Whether an event with this title starts at ``start``."""
        return any(ev["title"] == title and ev["start"] == start for ev in self.state["events"].values())
