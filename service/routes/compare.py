"""``/v1/compare``: is the difference between two sets of runs real? The work is
`service.comparison.CompareService`'s; this only translates HTTP."""

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal
from service.deps import Compare
from service.schemas import Comparison
from training.metrics import MetricName

router = APIRouter(prefix="/v1/compare", tags=["studies"])
Ref = Annotated[str, Query(min_length=1, max_length=4096)]


@router.get("", response_model=Comparison)
async def compare(
    a: Ref, b: Ref, principal: Principal, comparisons: Compare, metric: MetricName = MetricName.top1
) -> Comparison:
    """``a − b`` paired on the seeds both sides ran: each side a job id, comma-separated job ids, or a study's cell
    (``STUDY_ID/CELL``, e.g. ``study-…/c002``). Each run counts its metric at its last epoch (only succeeded jobs);
    the answer has both sides' values by seed and the difference's mean, std, 95 % confidence interval (paired t),
    on how many seeds it was positive (and better), and how many seeds its spread would need to resolve it."""
    return await run_in_threadpool(comparisons.compare, a, b, str(metric), principal)
