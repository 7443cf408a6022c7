"""What a modified copy changes, and sessions that run only that (onnxslim_cv/regions.py)."""

from __future__ import annotations

import numpy as np

from onnxslim_cv import regions, runtime, sensitivity
from onnxslim_cv.ir import Model
from onnxslim_cv.testing import models as test_models


def test_changed_region_is_the_changed_nodes_and_everything_downstream():
    from onnxslim_cv.passes import prune as P

    model, dg, *_ = sensitivity.group_setup(Model.from_proto(test_models.build("resnet_basic_block")))
    order = [n.name for n in model.graph.nodes]
    for group in dg.prunable_groups:
        removed = list(group.units)[: max(1, len(group.units) // 2)]
        candidate = P.pruned_copy(model, dg, removed, "none", None, {})
        cut = regions.changed_region(model, candidate)
        first = min(order.index(n) for n in group.sources)
        assert cut is not None and set(group.sources) <= cut.names
        assert all(order.index(n) >= first for n in cut.names)  # nothing upstream of the group runs
        downstream = set()
        for node in candidate.graph.nodes:
            if node.name in group.sources or any(t.name in downstream for t in node.inputs):
                downstream.update(t.name for t in node.outputs)
                assert node.name in cut.names
        assert cut.outputs == tuple(t.name for t in model.graph.outputs)
    assert regions.changed_region(model, model.copy()).nodes == 0


def test_region_session_computes_the_candidate_s_values_from_the_original_s_at_the_cut():
    from onnxslim_cv.passes import prune as P

    proto = test_models.build("resnet_basic_block")
    model, dg, *_ = sensitivity.group_setup(Model.from_proto(proto))
    group = next(g for g in dg.prunable_groups if g.sources == ["conv4"])
    candidate = P.pruned_copy(model, dg, list(group.units)[:3], "none", None, {})
    region = regions.changed_region(model, candidate)
    feed = test_models.sample_inputs(proto, batch=2, seed=1)
    output = model.graph.outputs[0].name
    everything = runtime.make_session(model.to_proto())
    tapped = runtime.make_session(runtime.with_outputs(model.to_proto(), list(region.feeds)))
    at_cut = dict(zip(region.feeds, runtime.run(tapped, feed, list(region.feeds))))
    session = regions.region_session(candidate, region, at_cut, [output])
    assert len(session.get_inputs()) == len(region.feeds)
    whole = runtime.run(runtime.make_session(candidate.to_proto()), feed, [output])[0]
    np.testing.assert_allclose(runtime.run(session, at_cut, [output])[0], whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(whole, runtime.run(everything, feed, [output])[0])  # the pruning did change it
