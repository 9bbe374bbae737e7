"""CallGate's shedding decision: refuse a share of Predict calls only past the bound."""

from service.api.backlog import Backlog
from service.api.gate import CallGate
from service.api.status import RpcOutcomes
from service.metrics import Metrics
from tests.unit.service.api.test_backlog import Core


def test_the_gate_refuses_only_with_a_backlog_over_the_bound_and_names_the_setting():
    core = Core()
    backlog = Backlog(core.counts)
    gate = CallGate(1024, RpcOutcomes(Metrics()), backlog, max_wait=0.01)
    assert gate.overloaded() is None

    backlog.wait_seconds = 1.0  # far past the bound: the share refused is the maximum
    refusals = [gate.overloaded() for _ in range(2000)]
    refused = [r for r in refusals if r is not None]

    assert 0.9 < len(refused) / len(refusals) < 0.99
    assert "FITSERVE_INFERENCE__MAX_QUEUE_WAIT_MS" in refused[0].message
    assert refused[0].retry_after_seconds == 1.0
    assert CallGate(1024, RpcOutcomes(Metrics())).overloaded() is None  # shedding off
