"""The configuration model: one TOML file, every key typed, defaulted and documented.

`extra="forbid"` everywhere so that `orch-worker config check` names every misspelt key instead
of silently running with a default the user did not mean.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orch_worker.domain.timewindows import parse_windows
from orch_worker.domain.types import Identifier, NonNegAmount, PosAmount, Ratio


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaProfile(StrEnum):
    KAFKA = "kafka"
    """Apache Kafka or a compatible service with full semantics (the production default)."""
    EMBEDDED = "embedded"
    """The embedded Tansu broker: no idempotent producer, fast group joins."""


Codec = Literal["gzip", "snappy", "lz4", "zstd"]


class KafkaConfig(Section):
    bootstrap: str = Field(default="127.0.0.1:9092", description="host:port[,host:port]")
    topic_prefix: str = Field(default="orch.", pattern=r"^[A-Za-z0-9._-]*$")
    profile: KafkaProfile = KafkaProfile.KAFKA
    partitions: int = Field(default=6, ge=1, description="partitions when topics are created")
    replication_factor: int = Field(default=1, ge=1)
    create_topics: bool = Field(default=True, description="create missing topics at start-up")
    enable_idempotence: bool | None = Field(
        default=None, description="idempotent producer; default on for kafka, off for embedded"
    )
    session_timeout_ms: int | None = Field(default=None, ge=500)
    heartbeat_interval_ms: int | None = Field(default=None, ge=50)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_message_bytes: int = Field(default=1_048_576, ge=1024)
    compression: Literal["none"] | Codec = Field(
        default="zstd",
        description="producer compression: decisions are JSON states several KiB large that "
        "compress several-fold, which cuts broker storage and network. zstd (aiokafka: level "
        "3) by default: on the worker's records it took a quarter of the CPU of aiokafka's "
        "lz4, which compresses at level 9, and packed twice as tight; compressing a request "
        "holds the producer's event loop, and with it any release falling due",
    )
    fetch_max_wait_ms: int | None = Field(
        default=None,
        ge=0,
        description="longest a fetch waits for data; default 500 on kafka, 20 on embedded "
        "(the embedded broker holds every fetch for the whole wait, so this is each hop's "
        "latency; shorter waits make a dozen idle consumers cost the broker a core)",
    )

    @property
    def fetch_wait(self) -> int:
        if self.fetch_max_wait_ms is not None:
            return self.fetch_max_wait_ms
        return 20 if self.profile is KafkaProfile.EMBEDDED else 500

    @property
    def compression_type(self) -> Codec | None:
        """The value aiokafka takes (None: uncompressed)."""
        return None if self.compression == "none" else self.compression

    @property
    def idempotence(self) -> bool:
        if self.enable_idempotence is not None:
            return self.enable_idempotence
        return self.profile is KafkaProfile.KAFKA

    @property
    def session_timeout(self) -> int:
        if self.session_timeout_ms is not None:
            return self.session_timeout_ms
        return 1000 if self.profile is KafkaProfile.EMBEDDED else 10_000

    @property
    def heartbeat_interval(self) -> int:
        if self.heartbeat_interval_ms is not None:
            return self.heartbeat_interval_ms
        return 100 if self.profile is KafkaProfile.EMBEDDED else 3_000


class InstrumentConfig(Section):
    value_per_unit: PosAmount = Field(description="money per 1.0 price move per 1.0 quantity")
    lot_step: PosAmount = Decimal("0.01")
    min_quantity: PosAmount = Decimal("0.01")
    max_quantity: PosAmount = Decimal("100")
    margin_rate: PosAmount = Decimal("0.05")
    risk_proxy_pct: NonNegAmount = Field(
        default=Decimal(1),
        description="an open position's risk, as % of its notional (quantity x value_per_unit x "
        "avg_price); account states carry no stops, so correlation limits use this proxy",
    )
    min_stop_distance: PosAmount | None = Field(
        default=None,
        description="the closest a stop loss may sit to the price; an `invalid_stops` reject is "
        "retried once with the stop moved out to this distance (unset: no adjustment, give up)",
    )
    sessions: tuple[str, ...] | None = Field(
        default=None,
        description='UTC trading sessions, "[Mon-Fri ]HH:MM-HH:MM"; a `market_closed` reject is '
        "retried when the next one opens (unset: no calendar, give up with the reason)",
    )

    @field_validator("sessions")
    @classmethod
    def _sessions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            parse_windows(value)
        return value

    @model_validator(mode="after")
    def _bounds(self) -> InstrumentConfig:
        if self.min_quantity > self.max_quantity:
            raise ValueError("min_quantity above max_quantity")
        return self


class RulesConfig(Section):
    """An account's trading rules; portfolio values are defaults, account values override."""

    risk_per_trade_pct: NonNegAmount | None = None
    max_daily_loss_pct: NonNegAmount | None = None
    max_drawdown_pct: NonNegAmount | None = None
    max_open_positions: int | None = Field(default=None, ge=0)
    min_free_margin: NonNegAmount | None = Field(
        default=None, description="money that must stay free after the order"
    )
    max_margin_use_pct: NonNegAmount | None = None
    max_quantity_per_symbol: NonNegAmount | None = None
    allowed_symbols: tuple[str, ...] | None = None
    blocked_symbols: tuple[str, ...] | None = None
    hedging_allowed: bool | None = Field(
        default=None,
        description="an opposite position in the same symbol may be opened; unset means no",
    )
    daily_risk_budget_pct: NonNegAmount | None = Field(
        default=None,
        description="stop-loss risk all of today's orders may take, % of day_start_equity",
    )
    drawdown_mode: Literal["static", "trailing"] | None = Field(
        default=None,
        description="max_drawdown_pct measured from the initial balance (static, the default) "
        "or from peak_equity (trailing)",
    )
    trading_windows: tuple[str, ...] | None = Field(
        default=None,
        description='UTC windows new orders may be placed in, "[Mon-Fri ]HH:MM-HH:MM"; '
        "unset means any time",
    )
    blackout_windows: tuple[str, ...] | None = Field(
        default=None, description='UTC windows with no new orders, "[Mon-Fri ]HH:MM-HH:MM"'
    )
    max_correlated_risk_pct: NonNegAmount | None = Field(
        default=None,
        description="the order's risk plus the correlated share of same-direction open risk, "
        "% of equity",
    )

    @field_validator("trading_windows", "blackout_windows")
    @classmethod
    def _windows(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            parse_windows(value)
        return value

    def merged(self, override: RulesConfig) -> RulesConfig:
        """These rules with every key the override sets replacing ours."""
        return self.model_copy(update=override.model_dump(exclude_none=True))


class AllocationMethod(StrEnum):
    RISK = "risk"
    EQUITY = "equity"
    AVAILABLE_MARGIN = "available_margin"
    EQUAL = "equal"
    RATIO = "ratio"


class StaggerConfig(Section):
    """When a signal's per-account orders are released: spread over a window, for rate limits,
    market impact and fair rotation (never to disguise that the accounts trade together)."""

    min_s: float = Field(default=1.0, ge=0, description="the first account goes this late")
    max_s: float = Field(default=30.0, ge=0, description="no account goes later than this")
    min_spacing_s: float = Field(
        default=0.0, ge=0, description="at least this long between two releases of the portfolio"
    )
    volatility_ref: float = Field(
        default=0.01,
        gt=0,
        description="the window shrinks as 1/(1 + volatility/volatility_ref): at this "
        "volatility it is half as long",
    )
    max_drift_bps: float | None = Field(
        default=None,
        gt=0,
        description="an intent is expired, not released, once the price has moved this far "
        "from the signal's reference price (needs prices on the prices topic)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> StaggerConfig:
        if self.min_s > self.max_s:
            raise ValueError("stagger.min_s above stagger.max_s")
        return self


class ScoreWeights(Section):
    """How eligible accounts are ranked when `max_accounts` keeps only the best."""

    margin: NonNegAmount = Field(default=Decimal("0.30"), description="free margin headroom")
    risk_budget: NonNegAmount = Field(
        default=Decimal("0.25"), description="the tightest of risk budget, daily loss, drawdown"
    )
    health: NonNegAmount = Field(default=Decimal("0.20"), description="recent rejects, failures")
    quality: NonNegAmount = Field(default=Decimal("0.15"), description="fill rate, slippage")
    correlation: NonNegAmount = Field(
        default=Decimal("0.10"), description="less correlated open risk is better"
    )

    @model_validator(mode="after")
    def _some_weight(self) -> ScoreWeights:
        if self.margin + self.risk_budget + self.health + self.quality + self.correlation <= 0:
            raise ValueError("score weights add up to zero")
        return self


class ExecutionConfig(Section):
    """How released orders are followed to a terminal state: partial fills, retries by reject
    reason, the per-account circuit breaker and escalation to a human (`[portfolios.P.execution]`).
    """

    partial_fill_threshold: Ratio = Field(
        default=0.8,
        description="a partially filled order with at least this share filled is accepted and "
        "the rest cancelled (limit orders at once; any order at the completion timeout)",
    )
    completion_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="an accepted order still open this long after its acceptance is cancelled and "
        "its remainder completed: re-priced, rerouted, or accepted as partial",
    )
    max_completion_attempts: int = Field(
        default=3, ge=0, description="completion and reroute intents per original order"
    )
    max_reprice_bps: float = Field(
        default=20.0,
        ge=0,
        description="a limit remainder is re-priced toward the market by at most this much from "
        "the signal's limit price (0: never re-price); never past the stop loss",
    )
    ack_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a released order (or a cancel) with no venue report this long has an unknown "
        "outcome: escalated, never blindly re-sent",
    )
    retry_base_s: float = Field(
        default=0.5, ge=0, description="backoff of the first retry after a transient reject"
    )
    retry_cap_s: float = Field(default=30.0, ge=0, description="longest backoff of one retry")
    retry_max_attempts: int = Field(
        default=3,
        ge=0,
        description="retries per original order after connection_error, timeout, rate_limited "
        "(and after market_closed, at each next session)",
    )
    reduce_share: Ratio = Field(
        default=0.7,
        gt=0,
        description="after insufficient_margin the remainder is retried at this share of itself",
    )
    max_reduce_attempts: int = Field(
        default=2, ge=0, description="reduced retries per original order"
    )
    suspension_cooldown_s: float = Field(
        default=86_400.0,
        ge=0,
        description="an account that rejected with account_suspended is left out of planning and "
        "reroutes this long",
    )
    breaker_failures: int = Field(
        default=5,
        ge=1,
        description="this many failures (connection_error, timeout, rate_limited, other, unknown "
        "outcome) of one account within breaker_window_s open its circuit breaker",
    )
    breaker_window_s: float = Field(default=60.0, gt=0)
    breaker_cooldown_s: float = Field(
        default=300.0,
        ge=0,
        description="an open breaker keeps the account out of planning this long",
    )
    intervention_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="an intervention nobody resolves takes its default action after this long",
    )
    intervention_default_action: Literal["retry", "reroute", "accept_partial", "cancel"] = Field(
        default="accept_partial",
        description="what an unresolved intervention does at its timeout (retry is never taken "
        "by default for an order whose outcome is unknown: accept_partial instead)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ExecutionConfig:
        if self.retry_base_s > self.retry_cap_s:
            raise ValueError("execution.retry_base_s above execution.retry_cap_s")
        return self


class PortfolioConfig(Section):
    allocation: AllocationMethod = AllocationMethod.EQUAL
    stagger: StaggerConfig = StaggerConfig()
    execution: ExecutionConfig = ExecutionConfig()
    max_accounts: int | None = Field(default=None, ge=1)
    cross_account_hedging_allowed: bool = False
    rules: RulesConfig = RulesConfig()
    score_weights: ScoreWeights = ScoreWeights()
    max_alternatives: int = Field(
        default=20, ge=0, description="ranked eligible-but-unused accounts kept for reroutes"
    )
    max_cluster_risk_share: Ratio | None = Field(
        default=None,
        description="cap on the share of the portfolio's open risk in the signal's correlated "
        "cluster after the trade",
    )
    correlation_cluster_threshold: Ratio = Field(
        default=0.7,
        description="positions whose correlation with the signal's direction is at least this "
        "are in its cluster",
    )
    cluster_risk_floor_pct: NonNegAmount = Field(
        default=Decimal(1),
        description="the cluster share's denominator is at least this % of portfolio equity, so "
        "the first trade of a flat portfolio is not 100% concentrated",
    )
    correlation_limit_action: Literal["reduce", "reject"] = Field(
        default="reduce",
        description="over max_cluster_risk_share: shrink the plan to fit, or reject the signal",
    )


class BrokerConfig(Section):
    max_orders_per_s: float | None = Field(
        default=None, gt=0, description="rate budget shared by every account at this broker"
    )


class AccountConfig(Section):
    portfolio: Identifier
    broker: Identifier = "paper"
    ratio: PosAmount = Decimal(1)
    initial_balance: PosAmount | None = Field(
        default=None,
        description="base of a static max_drawdown_pct; unset means the state's balance",
    )
    rules: RulesConfig = RulesConfig()


class WorkerConfig(Section):
    group_id: str = "orch-worker"
    http_port: int = Field(default=9464, ge=0, le=65535)
    http_host: str = Field(default="127.0.0.1", description="0.0.0.0 inside a container")
    max_signal_age_s: float = Field(
        default=300.0, gt=0, description="older signals are refused, whatever the offset reset"
    )
    max_batch: int = Field(default=500, ge=1, description="records handled per poll")
    control_secret: SecretStr | None = Field(
        default=None,
        description="HMAC-SHA256 key control commands must be signed with (also "
        "ORCH_CONTROL_SECRET); unset means commands are not authenticated",
    )
    control_max_age_s: float = Field(
        default=300.0, gt=0, description="signed commands older than this are refused"
    )
    control_max_skew_s: float = Field(
        default=30.0, ge=0, description="tolerated clock skew for commands issued in the future"
    )
    finished_linger_s: float = Field(
        default=600.0,
        ge=0,
        description="finished signals stay in memory this long (late reports are still "
        "matched), then only their ids are kept until max_signal_age_s",
    )
    freeze_heap: bool = Field(
        default=True,
        description="freeze the heap after each decision so garbage collection pauses stay "
        "out of release timing (see adapters/heap.py)",
    )
    full_gc_every_s: float = Field(
        default=600.0, gt=0, description="how often a full collection reclaims frozen garbage"
    )
    max_open_signals: int = Field(
        default=2_000,
        ge=1,
        description="open (planned, not terminal) signals at which new signals wait in Kafka "
        "until some finish; memory grows with this, not with the backlog",
    )
    snapshot_every: int = Field(
        default=1_000,
        ge=0,
        description="decisions of a changelog partition between two snapshots of its state; "
        "recovery reads from the newest snapshot on (0: never, recovery reads everything)",
    )
    releases_behind_ms: float = Field(
        default=200.0,
        gt=0,
        description="due releases this late at which new signals are paused until the timers "
        "have caught up (below a quarter of it): scheduled releases come before new plans",
    )
    reports_first_at: int = Field(
        default=500,
        ge=1,
        description="routed reports and commands waiting at which new signals are paused "
        "until they are all read, so orders are not timed out behind a signal backlog",
    )


class VenueConfig(Section):
    seed: int = 42
    group_id: str = "orch-venue"
    http_port: int = Field(default=9465, ge=0, le=65535)
    latency_ms_min: float = Field(default=5.0, ge=0)
    latency_ms_max: float = Field(default=50.0, ge=0)
    partial_fill_probability: Ratio = 0.2
    partial_fill_min_share: Ratio = 0.3
    reject_probability: dict[str, Ratio] = Field(
        default_factory=dict, description="reason_code -> probability of that reject"
    )
    slippage_bps_max: NonNegAmount = Decimal(2)
    faults_max_attempt: int | None = Field(
        default=None,
        ge=1,
        description="random rejects and partial fills hit only intents up to this attempt number "
        "on their account, so a retry or completion goes through (a transient fault); unset: "
        "every attempt",
    )
    account_reject: dict[str, str] = Field(
        default_factory=dict,
        description="account_id -> reason code the orders of that account are rejected with "
        '(e.g. "account_suspended"), up to faults_max_attempt',
    )
    silent_accounts: tuple[str, ...] = Field(
        default=(),
        description="accounts whose orders (and cancels) get no report at all, as if the bridge "
        "lost them: the orchestrator sees an unknown outcome",
    )

    @model_validator(mode="after")
    def _valid(self) -> VenueConfig:
        from orch_worker.domain.models import ReasonCode

        codes = {r.value for r in ReasonCode}
        bad = sorted(c for c in self.account_reject.values() if c not in codes)
        if bad:
            raise ValueError(f"account_reject: unknown reason codes: {', '.join(bad)}")
        unknown = sorted(set(self.reject_probability) - {r.value for r in ReasonCode})
        if unknown:
            raise ValueError(f"unknown reject reason codes: {', '.join(unknown)}")
        if sum(self.reject_probability.values()) > 1:
            raise ValueError("reject probabilities add up to more than 1")
        if self.latency_ms_min > self.latency_ms_max:
            raise ValueError("latency_ms_min above latency_ms_max")
        return self


class SinkConfig(Section):
    db: str = Field(
        default="sqlite:///orch-audit.db", description="sqlite:///path or postgresql://"
    )
    group_id: str = "orch-sink"
    http_port: int = Field(default=9466, ge=0, le=65535)
    batch_size: int = Field(default=1000, ge=1)
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="`orch-worker audit prune` deletes whole finished signals older than this; "
        "unset keeps everything (nothing is ever pruned without it or an explicit --before)",
    )


class OrchConfig(Section):
    kafka: KafkaConfig = KafkaConfig()
    worker: WorkerConfig = WorkerConfig()
    instruments: dict[str, InstrumentConfig] = Field(default_factory=dict)
    portfolios: dict[str, PortfolioConfig] = Field(default_factory=dict)
    accounts: dict[str, AccountConfig] = Field(default_factory=dict)
    brokers: dict[str, BrokerConfig] = Field(default_factory=dict)
    venue: VenueConfig = VenueConfig()
    sink: SinkConfig = SinkConfig()
    correlations: dict[str, float] = Field(
        default_factory=dict,
        description='instrument correlations, "EURUSD/GBPUSD" = 0.85; symmetric, 1 on the '
        "diagonal, 0 where not given",
    )

    @model_validator(mode="after")
    def _references(self) -> OrchConfig:
        bad = [
            f"accounts.{a}.portfolio: unknown portfolio {c.portfolio!r}"
            for a, c in self.accounts.items()
            if c.portfolio not in self.portfolios
        ]
        if bad:
            raise ValueError("; ".join(bad))
        return self

    @field_validator("correlations")
    @classmethod
    def _correlations(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        instruments = info.data.get("instruments", {})
        bad: list[str] = []
        seen: dict[frozenset[str], float] = {}
        for key, rho in value.items():
            where = f"correlations.{key}"
            pair = [p.strip() for p in key.split("/")]
            if len(pair) != 2 or not all(pair):
                bad.append(f'{where}: key must be "SYMBOL/SYMBOL"')
                continue
            unknown = [p for p in pair if p not in instruments]
            if unknown:
                bad.append(f"{where}: unknown instrument {', '.join(unknown)}")
            if not -1.0 <= rho <= 1.0:
                bad.append(f"{where}: correlation {rho} is outside [-1, 1]")
            if pair[0] == pair[1] and rho != 1.0:
                bad.append(f"{where}: a symbol's correlation with itself is 1")
            previous = seen.setdefault(frozenset(pair), rho)
            if previous != rho:
                bad.append(f"{where}: contradicts the reverse pair ({previous})")
        if bad:
            raise ValueError("; ".join(bad))
        return value

    def rules_for(self, account_id: str) -> RulesConfig:
        account = self.accounts[account_id]
        return self.portfolios[account.portfolio].rules.merged(account.rules)

    def accounts_of(self, portfolio: str) -> tuple[str, ...]:
        return tuple(sorted(a for a, c in self.accounts.items() if c.portfolio == portfolio))
