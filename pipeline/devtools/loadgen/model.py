"""The traffic model behind `omnilog produce`: what an MCP/AI gateway's requests look like.

Numbers are plausible rather than measured from a real gateway: a method mix dominated by tool
calls, log-normal latencies with a heavier tail for model calls, a few percent errors, token counts
and prices of the shape LLM providers publish. Every table is data, so a benchmark can reason about
it (and tests can check the generator follows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class MethodProfile:
    name: str
    weight: float  # share of traffic (normalised over all methods)
    latency_median_ms: float  # log-normal: median = exp(mu)
    latency_sigma: float
    error_rate: float
    usage: str | None  # None, "model" (usage with tokens) or "tool" (mcp_tool usage)
    response: bool = True  # notifications get no response body


METHODS: Final = (
    MethodProfile("tools/call", 0.42, 180.0, 1.0, 0.04, "tool"),
    MethodProfile("sampling/createMessage", 0.08, 1400.0, 0.7, 0.03, "model"),
    MethodProfile("resources/read", 0.14, 45.0, 0.8, 0.02, None),
    MethodProfile("tools/list", 0.10, 12.0, 0.5, 0.005, None),
    MethodProfile("resources/list", 0.04, 15.0, 0.5, 0.005, None),
    MethodProfile("prompts/get", 0.05, 20.0, 0.6, 0.01, None),
    MethodProfile("prompts/list", 0.02, 10.0, 0.5, 0.005, None),
    MethodProfile("initialize", 0.06, 35.0, 0.6, 0.01, None),
    MethodProfile("notifications/initialized", 0.04, 2.0, 0.4, 0.0, None, response=False),
    MethodProfile("ping", 0.03, 1.5, 0.4, 0.0, None),
    MethodProfile("completion/complete", 0.02, 60.0, 0.6, 0.01, None),
)

# Status codes of failed requests and their weights; 429 and 504 map to usage status
# rate_limited and timeout.
ERROR_STATUSES: Final = ((400, 0.18), (401, 0.05), (403, 0.05), (404, 0.12), (429, 0.15), (500, 0.2),
                         (502, 0.1), (503, 0.08), (504, 0.07))  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str
    weight: float
    input_cents_per_mtok: int  # US cents per million tokens
    output_cents_per_mtok: int


MODELS: Final = (
    ModelPrice("claude-sonnet-4", 0.35, 300, 1500),
    ModelPrice("claude-haiku-3.5", 0.25, 80, 400),
    ModelPrice("gpt-4o", 0.2, 250, 1000),
    ModelPrice("gpt-4o-mini", 0.15, 15, 60),
    ModelPrice("claude-opus-4", 0.05, 1500, 7500),
)

TOOL_NAMES: Final = (
    "search_docs", "read_file", "write_file", "list_directory", "run_query", "create_issue",
    "get_weather", "send_message", "fetch_url", "list_tables", "describe_table", "git_log",
    "git_diff", "create_pull_request", "search_code", "get_ticket", "update_ticket", "calendar_list",
    "translate_text", "summarize",
)  # fmt: skip

RESOURCE_SCHEMES: Final = (
    "file:///workspace/",
    "postgres://db/tables/",
    "https://docs.internal/",
    "git://repo/",
)

_TEXT: Final = (
    "the quarterly report shows revenue growth in all regions while costs stayed flat and the "
    "team shipped the new billing pipeline ahead of schedule customers asked about export formats "
    "latency budgets retries idempotent writes partition keys schema versions dashboards alerts "
    "incident review action items owner deadline migration rollback feature flag experiment cohort"
)
WORDS: Final = tuple(_TEXT.split())

USER_AGENTS: Final = (
    "claude-desktop/0.9.3",
    "cursor/1.2.4",
    "mcp-python-sdk/1.9.0",
    "mcp-typescript-sdk/1.12.1",
    "vscode-copilot/1.300",
)

PROTOCOL_VERSIONS: Final = ("2025-06-18", "2025-03-26", "2024-11-05")
