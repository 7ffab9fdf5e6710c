"""A deadline stops a bound computation inside the CROWN pass, and a verification run turns that into ``timeout``
(not an answer past its budget, not an error)."""

import pytest
import torch

from lingraft.bounds import BoundedNetwork, input_box
from lingraft.clock import DeadlineExceeded, now
from lingraft.models import create_model
from lingraft.spec.vnnlib import parse_vnnlib
from lingraft.verify import bounding, verify_property
from lingraft.verify.bounding import bound_domains

IN = (1, 12, 12)


def _net_and_box():
    torch.manual_seed(0)
    model = create_model("cnn-b", IN).eval()
    xl, xu = input_box(torch.rand(1, *IN), 0.05)
    return model, BoundedNetwork(model, IN), xl, xu


def test_crown_pass_past_its_deadline_raises():
    _, net, xl, xu = _net_and_box()
    assert net.crown_nodes(), "the test needs a network with CROWN-bounded intermediate nodes"
    with pytest.raises(DeadlineExceeded):
        net.intermediate_bounds(xl, xu, deadline=now() - 1.0)
    bounds = net.intermediate_bounds(xl, xu, deadline=now() + 600.0)  # a deadline far off changes nothing
    ref = net.intermediate_bounds(xl, xu)
    assert all((a is None and b is None) or torch.equal(a[0], b[0]) for a, b in zip(bounds, ref))


def test_bound_domains_passes_its_deadline_to_crown():
    _, net, xl, xu = _net_and_box()
    C = torch.eye(10)[None, :3]
    with pytest.raises(DeadlineExceeded):
        bound_domains(net, xl, xu, C, deadline=now() - 1.0)


def test_verify_turns_a_deadline_inside_crown_into_timeout(monkeypatch):
    """The CROWN pass of the first step runs into the deadline: the answer is ``timeout``."""
    model, _, xl, xu = _net_and_box()
    y = model((xl + xu) / 2).argmax(1).item()
    other = (y + 1) % 10
    lines = [f"(declare-const X_{i} Real)" for i in range(xl.numel())]
    lines += [f"(declare-const Y_{j} Real)" for j in range(10)]
    for i, (lo, up) in enumerate(zip(xl.flatten().tolist(), xu.flatten().tolist())):
        lines += [f"(assert (>= X_{i} {lo:.8f}))", f"(assert (<= X_{i} {up:.8f}))"]
    lines.append(f"(assert (>= Y_{other} Y_{y}))")
    prop = parse_vnnlib("\n".join(lines))

    real = bounding.bound_domains

    def late(*args, **kw):
        kw["deadline"] = now() - 1.0  # as if the CROWN pass had started just before the deadline
        return real(*args, **kw)

    monkeypatch.setattr("lingraft.verify.core.bound_domains", late)
    res = verify_property(model, prop, in_shape=IN, timeout=60)
    assert res.status == "timeout", res.stats
