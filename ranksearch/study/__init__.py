"""The study: settings, the search loop, and what the terminal shows."""

from ranksearch.study.runner import RunContext, SearchResult, load_problem, run_search
from ranksearch.study.settings import RunSettings

__all__ = ["RunContext", "RunSettings", "SearchResult", "load_problem", "run_search"]
