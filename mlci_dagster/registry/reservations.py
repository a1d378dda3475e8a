"""Reservations in mlci.yaml: reserved hardware that test batches share with people by day, and
the nightly schedule's start that a daytime deployment must be down before."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from mlci_dagster.registry import localtime
from mlci_dagster.registry.base import PROVIDER_NAMES, Name, StrictModel, valid_name
from mlci_dagster.vocabulary import KEY_SEPARATOR

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _clock(value: str) -> str:
    localtime.parse_clock(value)
    return value


def _timezone(value: str) -> str:
    localtime.zone(value)
    return value


ClockTime = Annotated[str, AfterValidator(_clock)]
Timezone = Annotated[str, AfterValidator(_timezone)]


class NightlySettings(StrictModel):
    """When the nightly schedule starts its batch, every day."""

    at: ClockTime = Field(default="02:00", description="HH:MM, in `timezone`.")
    timezone: Timezone = "UTC"

    @property
    def cron(self) -> str:
        return localtime.cron(localtime.parse_clock(self.at))

    def starts(self, start: float) -> list[float]:
        """Its start times over the 366 days from `start`."""
        times = localtime.instants(localtime.parse_clock(self.at), localtime.zone(self.timezone),
                                   start)
        return [t for t, _ in zip(times, range(366), strict=False)]

    def next_start(self, after: float) -> float:
        return localtime.next_instant(localtime.parse_clock(self.at),
                                      localtime.zone(self.timezone), after)


class DaytimeSpec(StrictModel):
    """A deployment stood up for people every working morning and torn down every evening,
    before the nightly batch: the reservation's daytime intent."""

    intent: str = Field(description="The config whose sandbox people use by day: its name, or "
                        "`config|engine` for another engine than its first. It must bind to "
                        "this reservation (sandbox.reservation).")
    up: ClockTime = Field(default="08:00", description="HH:MM in the reservation's timezone.")
    down: ClockTime = Field(default="19:00", description="HH:MM in the reservation's timezone, "
                            "after `up` and before the nightly schedule's start.")
    weekdays: Annotated[list[Weekday], Field(min_length=1)] = Field(
        default=["mon", "tue", "wed", "thu", "fri"], description="The days it stands up.")
    description: str = ""

    @field_validator("intent")
    @classmethod
    def _partition_or_name(cls, value: str) -> str:
        config, separator, engine = value.partition(KEY_SEPARATOR)
        valid_name(config)
        if separator:
            valid_name(engine)
        return value

    @model_validator(mode="after")
    def _up_before_down(self) -> DaytimeSpec:
        if localtime.parse_clock(self.up) >= localtime.parse_clock(self.down):
            raise ValueError(f"up: {self.up} is not before down {self.down} (expected a "
                             "window within one day)")
        if len(set(self.weekdays)) != len(self.weekdays):
            raise ValueError("weekdays: a day is listed twice")
        return self

    @property
    def config(self) -> str:
        return self.intent.partition(KEY_SEPARATOR)[0]

    @property
    def engine(self) -> str | None:
        return self.intent.partition(KEY_SEPARATOR)[2] or None


class ReservationSpec(StrictModel):
    """Reserved capacity: at most `capacity` sandboxes of the configs bound to it at once,
    counting its daytime deployment while that is up."""

    name: Name
    provider: str = Field(description="The provider whose sandboxes use it; every config bound "
                          "to it has this sandbox.provider.")
    account: str = Field(
        default="default", min_length=1, description="The provider account the capacity is "
        "reserved in (an AWS account, a GCP project, a cluster): at most one daytime "
        "reservation per provider account.")
    capacity: Annotated[int, Field(ge=1, le=1000)] = Field(
        description="How many sandboxes may exist at once: the slots its leases take.")
    timezone: Timezone = Field(default="UTC", description="Where `daytime` times are read.")
    daytime: DaytimeSpec | None = None
    description: str = ""

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {value!r} (expected one of: "
                             f"{', '.join(PROVIDER_NAMES)})")
        return value

    def next_down(self, after: float) -> float:
        """The first scheduled down strictly after `after`."""
        assert self.daytime is not None
        return localtime.next_instant(localtime.parse_clock(self.daytime.down),
                                      localtime.zone(self.timezone), after,
                                      self.daytime.weekdays)

    def up_cron(self) -> str:
        assert self.daytime is not None
        return localtime.cron(localtime.parse_clock(self.daytime.up), self.daytime.weekdays)

    def down_cron(self) -> str:
        assert self.daytime is not None
        return localtime.cron(localtime.parse_clock(self.daytime.down), self.daytime.weekdays)

    def nightly_inside_window(self, nightly: NightlySettings, start: float) -> list[str]:
        """The distinct local times (`18:00 PST`) at which the nightly schedule starts inside
        this reservation's daytime window over the year from `start`: none, for a valid one."""
        assert self.daytime is not None
        tz = localtime.zone(self.timezone)
        up, down = (localtime.parse_clock(t) for t in (self.daytime.up, self.daytime.down))
        found: list[str] = []
        for moment in nightly.starts(start):
            seen = localtime.local(moment, tz)
            if localtime.WEEKDAYS[seen.weekday()] in self.daytime.weekdays and \
                    up <= seen.time() < down and (text := seen.strftime("%H:%M %Z")) not in found:
                found.append(text)
        return found


def reservation_problems(reservations: list[ReservationSpec], pools: set[str],
                         nightly: NightlySettings, start: float) -> list[str]:
    """The invariants between reservations, each `reservations[i].field: what was expected`:
    unique names, distinct from pools; at most one daytime reservation per provider account;
    every daytime window down before the nightly schedule starts."""
    problems = []
    seen: dict[str, int] = {}
    daytime_of: dict[tuple[str, str], int] = {}
    for i, reservation in enumerate(reservations):
        if reservation.name in seen:
            problems.append(f"reservations[{i}].name: duplicate reservation "
                            f"'{reservation.name}' (also reservations[{seen[reservation.name]}])")
        seen.setdefault(reservation.name, i)
        if reservation.name in pools:
            problems.append(f"reservations[{i}].name: '{reservation.name}' is also a pool "
                            "(expected distinct names: a reservation is a pool of its own)")
        if reservation.daytime is None:
            continue
        account = (reservation.provider, reservation.account)
        if account in daytime_of:
            first = daytime_of[account]
            problems.append(
                f"reservations[{i}].daytime: a second daytime reservation on provider "
                f"'{account[0]}', account '{account[1]}' (reservations[{first}] "
                f"'{reservations[first].name}' has one; expected at most one per provider "
                "account)")
        daytime_of.setdefault(account, i)
        inside = reservation.nightly_inside_window(nightly, start)
        if inside:
            problems.append(
                f"reservations[{i}].daytime.down: {reservation.daytime.down} "
                f"{reservation.timezone} is not before the nightly schedule's start "
                f"({nightly.at} {nightly.timezone}, which is {' or '.join(inside)} there, "
                f"inside the window {reservation.daytime.up}-{reservation.daytime.down}): "
                "expected the daytime deployment down before the batch starts")
    return problems
