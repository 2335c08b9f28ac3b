"""The study: settings, the prepared search, its objective, the search loop, workers, and what the terminal shows."""

from ranksearch.study.objective import Objective
from ranksearch.study.prepared import PreparedSearch
from ranksearch.study.problem import RunContext, load_problem
from ranksearch.study.result import SearchResult
from ranksearch.study.runner import run_search
from ranksearch.study.settings import InfraSpec, ProblemSpec, RunSettings, SearchSpec

__all__ = [
    "InfraSpec",
    "Objective",
    "PreparedSearch",
    "ProblemSpec",
    "RunContext",
    "RunSettings",
    "SearchResult",
    "SearchSpec",
    "load_problem",
    "run_search",
]
