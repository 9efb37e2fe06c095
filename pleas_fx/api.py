"""The public entry point: merge() runs the compiler passes as a pipeline."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from pleas_fx.calibration import calibration
from pleas_fx.options import MergeOptions
from pleas_fx.passes import methods
from pleas_fx.passes.allocate import WidthAllocator
from pleas_fx.passes.compact import compact, stored_zeros
from pleas_fx.passes.distill import distill, split_holdout
from pleas_fx.passes.fill import MergedInputOptions, fill_models
from pleas_fx.passes.merged_inputs import leading_batches, refined_samples
from pleas_fx.passes.mixup import top_up_batches
from pleas_fx.passes.footprint import Footprint
from pleas_fx.passes.frozen import FrozenSummary, frozen_summary
from pleas_fx.passes.heads import SeparateHeads, separate_heads
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.layernorm import per_model_layernorms
from pleas_fx.passes.matching import dropped_sites
from pleas_fx.passes.statistics import Statistics, collect_statistics
from pleas_fx.passes.trace import TracedPair, trace_pair
from pleas_fx.passes.tied import scale_tied_embeddings
from pleas_fx.passes.verify import check_graph, fake_check_pays, structural_parameters, verify_merged
from pleas_fx.passes.weights import WeightPlan, plan_weights
from pleas_fx.passes.widen import widen
from pleas_fx.report import Timer, merge_report

log = logging.getLogger("pleas_fx")

# what merge() does with a frozen hidden axis (docs/DESIGN.md, "Frozen axes")
FROZEN_POLICY = {"model_a": "model A's features are kept on them and least squares fits the layers after them to "
                            "both models' targets",
                 "average": "their features are averaged entry by entry, unaligned"}


def merge(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    example_input: Any,
    budget: float | Sequence[float],
    data: Iterable | str | Callable | None = None,
    *,
    method: str = "pleas",
    heads: str = "shared",
    repair: bool | None = None,
    matching: str | None = None,
    max_batches: int | None = None,
    generated_batches_count: int = 8,
    ridge: float = 1e-4,
    max_ls_dim: int = 10_000,
    stats_dtype: torch.dtype = torch.float64,
    positions: int | str | None = "auto",
    progress: bool | None = None,
    seed: int = 0,
    allocation: str = "highs",
    budget_metric: str = "params",
    width_grid: int | Sequence[float] = 8,
    allocation_time_limit: float = 10.0,
    proxy: str = "cost",
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    frozen: str | None = None,
    least_squares: str = "merged",
    layernorm: str = "per_model",
    emit: str = "compact",
    distill: int = 0,
    distill_lr: float = 3e-4,
    mixup: bool = True,
) -> fx.GraphModule | list[fx.GraphModule]:
    """Merge two same-architecture models into one of `budget` x one model's parameters.

    Args:
        model_a, model_b: the source models (never modified).
        example_input: a tensor, a tuple of tensors, or a dict of tensors by input name (e.g.
            input_ids and attention_mask; left-out inputs take their defaults) the models
            accept; fixes shapes. Integer inputs (token ids) are never averaged or permuted.
        budget: in [1, 2]; 1 merges every feature pair, 2 keeps both models whole (the
            ensemble). A list of budgets returns one merged model per budget from a single
            statistics pass.
        data: calibration data: an iterable of batches (a tensor, or a tuple/list whose first
            element is the input); or generated inputs shaped like example_input (PLeaS-free):
            "procedural" (structured random images: smooth fields, gratings, stripes, blobs;
            pleas_fx/procedural.py), "gaussian" (white noise), or a function
            `fn(example_args, n_batches, seed) -> list of batches`. None: the data-free mode,
            weight matching and least-squares statistics from Gaussian inputs.
        method: "pleas" (default), or a baseline built from the same passes (passes/methods.py):
            "average" (plain weight averaging), "rebasin_weight" (Git Re-Basin weight matching,
            permuted weights averaged), "permute" (activation matching, permuted weights
            averaged), "zipit" (ZipIt!: features merged within and across models), "regmean"
            (RegMean least squares, no permutations). At a budget above 1 every method keeps
            its worst-matched features apart, with widths from the same allocator.
        heads: "shared" (one output: the label spaces are the same, the heads are averaged) or
            "separate" (different label spaces: everything up to the last weight layer is merged,
            each model keeps its own head on the merged features, and the merged model returns
            the tuple (out_A, out_B); the budget counts one head, the second head is extra and
            reported in meta["pleas_fx"]["extra_head_parameters"]).
        repair: reset every BatchNorm's running statistics on the calibration data after
            merging (REPAIR-style). None: on for the baselines that need it (all but pleas),
            when data is given.
        matching: for method="pleas": "activation" (default with data) or "weight" (Git
            Re-Basin, no data).
        max_batches: use at most this many batches of `data`.
        ridge: least-squares ridge, relative to the mean input second moment, pulling
            towards the permute-and-average weights.
        max_ls_dim: weight nodes whose stacked input is larger are mapped, not solved.
        stats_dtype: dtype of the running statistics sums (float64; products are taken in
            the activations' precision, a few thousand rows at a time).
        positions: "auto" (default): each convolution's moments, and each matching site's, read
            just enough randomly drawn output positions per sample for their size (at least 32
            rows per least-squares input entry, 16 per site feature, 32,768 rows; every
            position of smaller maps; passes/positions.py), so large early maps cost no more
            than small late ones. None: every output position, summed exactly as
            cross-correlations of the feature maps at the kernel's tap offsets (no im2col;
            passes/patch_moments.py). An integer: that many drawn positions per sample for the
            least-squares moments (sites read every position; every position of a layer is read
            where summing them exactly is no dearer).
        progress: a tqdm progress bar for the data pass: True always, False never, None (default)
            only when stderr is a terminal.
        allocation: "highs" (default) chooses every group's width by a MIP solved with HiGHS
            (passes/allocate.py); "uniform" keeps the same share of every group apart.
        budget_metric: "params" (structural parameters) or "flops" (multiply-accumulates of
            Linear/conv layers on example_input); the budget is relative to one model's.
        width_grid: the MIP's width levels: n gives fractions 0, 1/n, ..., 1 of a group kept
            apart (or a list of fractions); leftover budget is then spent one feature at a time.
        allocation_time_limit: seconds HiGHS may spend per budget (best solution found is used).
        proxy: what the allocation maximises: "cost" (least matching cost of the merged pairs)
            or "loo" (the paper's leave-one-out proxy: needs `evaluate`).
        evaluate: for proxy="loo", evaluate(model) -> float, higher is better (e.g. accuracy on
            held-out data); called on len(groups) + 1 merged models.
        frozen: what a hidden axis gets when it must stay frozen (an op pleas_fx cannot map
            touches it; merge() then logs a WARNING and the report's "frozen_hidden" says how
            many units): "average" (feature i of A averaged with feature i of B, unaligned) or
            "model_a" (model A's features; least squares fits the layers after it to both
            models' targets). None (default): "average" with merged-input least squares (the
            layers after it are fitted to the merged network's own features: on digit ResNets
            with a frozen stage 73.5 / 75.6 / 77.1 against 72.2 / 73.5 / 75.3 at budgets
            1 / 1.5 / 2, 3 seeds, tools/bench_frozen.py), "model_a" otherwise (with
            least_squares="source" it scored 27-44 points above "average").
        least_squares: "merged" (default; beyond the paper): every solved layer is fitted, level by
            level, to the inputs the merged network itself feeds it (its earlier layers already
            filled), so errors do not compound, and the BatchNorm statistics written with it are
            those of the merged network on the calibration data (passes/merged_inputs.py; the
            leading 512 calibration samples advance level by level through the sources and every
            budget's merged model in lockstep: about one more forward pass of each; the statistics pass
            then skips the stacked source moments of the layers re-solved this way). "source": the paper's
            model of the merged input, M_in [x_A; x_B] from the sources' activations (one data pass
            for every budget).
        layernorm: "per_model" (default): a LayerNorm over a widened axis (the residual stream of a
            pre-norm transformer) normalises each model's features by that model's own statistics
            and merges them back (passes/layernorm.py): budget 2 is then the ensemble. "shared":
            one LayerNorm over the whole merged axis.
        emit: "compact" (default): every weight layer whose A-only outputs would read B-only inputs
            (or the reverse) is a block layer (pleas_fx.core.layers.BlockLinear / BlockConv) that
            stores only its structural blocks, so the model stores exactly the parameters the
            budget counts; "dense": the source's layer types at the merged widths, with those
            blocks stored as zeros (up to ~2x the budget's parameters).
        distill: epochs of distillation towards the ensemble after the fill (0, the default:
            off). The merged network is trained end to end on the calibration inputs, label-free,
            its outputs pulled towards both models' averaged outputs (passes/distill.py: eval
            mode, zero entries kept zero, a fifth of the samples held out and the best epoch
            kept, never worse than the fill on them; skipped at budget 2). Each epoch costs
            about three forward passes of the merged model over the calibration data; on the digit
            ResNet pairs of tools/bench_methods.py, 20 epochs added 1.5-2.8 points at budget 1 and 60
            epochs 2.8-5.3; on the VGG pairs, nothing at budget 1 and up to 0.4 at 1.5 (README).
        distill_lr: Adam's learning rate for `distill`, decayed to 0 on a cosine.
        mixup: with least_squares="merged" and the user's own data (default True): a layer whose
            calibration samples give fewer than 2 rows per entry of its widest merged input (a
            Linear layer on flattened features) is fitted on more samples: the calibration batches
            past the leading 512, then mixup copies of the leading ones (two samples of a batch
            mixed, the partner weighted up to 0.4; floating-point inputs only), at most twice the
            leading samples (passes/mixup.py; on the digit VGG pairs +0.3 to +0.8 points at budget
            1 and +0.1 to +0.4 at 1.5, README). False: every layer reads the leading samples only.

    Returns:
        An eval-mode torch.fx.GraphModule on example_input's device (or a list, one per
        budget), with a report in `merged.meta["pleas_fx"]`.
    """
    opts = MergeOptions.validated(
        budget, data, method=method, heads=heads, repair=repair, matching=matching, max_batches=max_batches,
        generated_batches_count=generated_batches_count, ridge=ridge, max_ls_dim=max_ls_dim,
        stats_dtype=stats_dtype, positions=positions, progress=progress, seed=seed, allocation=allocation,
        budget_metric=budget_metric, width_grid=width_grid, allocation_time_limit=allocation_time_limit,
        proxy=proxy, evaluate=evaluate, frozen=frozen, least_squares=least_squares,
        layernorm=layernorm, emit=emit, distill=distill, distill_lr=distill_lr, mixup=mixup)
    timer = Timer()
    with timer("trace"):
        traced = trace_pair(model_a, model_b, example_input)  # traced, lowered, checked, shape-propagated
    with timer("infer_groups"):
        spec = infer_groups(traced.gm_a)
    frozen = frozen_summary(spec, traced.gm_a)
    if frozen.frozen_units:
        log.warning("%s. Frozen units can be neither aligned nor kept apart: %s. See `pleas-fx inspect` for "
                    "where.", frozen.sentence(), FROZEN_POLICY[opts.frozen])
    head = separate_heads(spec, traced.gm_a) if opts.heads == "separate" else None
    weights = plan_weights(traced.gm_a, opts.max_ls_dim, spec.aliases) if opts.method.solve != "mapped" else WeightPlan()
    data_in = calibration(opts, traced)
    batches, total, held_out = data_in.batches, data_in.total, []
    if opts.distill:  # the samples distillation validates on are held out of the whole merge
        batches, held_out = split_holdout(batches)
        total = len(batches)
    with timer("statistics"):
        sites = methods.sites_to_measure(spec, opts.matching, opts.data is not None)
        stats = (collect_statistics(traced.gm_a, traced.gm_b, batches, weights.solved, sites,
                                    dtype=opts.stats_dtype, progress=opts.progress, total=total,
                                    positions=opts.positions, seed=opts.seed, full_sites=opts.matching == "zipit",
                                    refined_samples=refined_samples(batches) if opts.merged_inputs else None)
                 if weights.solved or sites else Statistics())
    with timer("matching"):
        match = methods.match(opts.matching, spec, stats, traced.gm_a, traced.gm_b, seed=opts.seed)
    dropped = dropped_sites(spec, stats)
    if weights.notes:
        log.info("%d weight(s) mapped, not solved: %s", len(weights.notes), "; ".join(weights.notes))
    if dropped:
        log.info("%d matching site(s) left out (non-finite activations): %s", len(dropped), ", ".join(dropped))
    build = _Builder(traced, spec, head, weights, stats, match, opts, batches, held_out, frozen, dropped)
    allocator = WidthAllocator(spec, match.pair_cost, build.footprint, traced.gm_a, opts.allocation,
                               lambda widths: build.model(widths, Timer())[0])
    all_widths, timers, allocations = [], [], []
    for b in opts.budgets:
        t = Timer(timer)
        with t("allocate"):
            all_widths.append(allocator.widths(b))
        allocations.append(allocator.report())
        timers.append(t)
    built = build.models(all_widths, timers)  # every budget filled together (one lockstep refinement)
    results = []
    for b, widths, t, one, allocation in zip(opts.budgets, all_widths, timers, built, allocations):
        merged = build.budget(b, widths, t, one)
        merged.meta["pleas_fx"]["allocation"] = allocation
        results.append(merged)
    return results if opts.many else results[0]


class _Builder:
    """Builds the merged model of one budget from the shared analysis: widen, fill, split the
    heads, repair BatchNorm statistics, verify, report."""

    def __init__(self, traced: TracedPair, spec, head: SeparateHeads | None, weights: WeightPlan,
                 stats: Statistics, match, opts: MergeOptions, batches, held_out: list, frozen: FrozenSummary,
                 dropped: list[str]) -> None:
        self.traced, self.spec, self.head, self.weights = traced, spec, head, weights
        self.stats, self.match, self.opts, self.batches, self.frozen = stats, match, opts, batches, frozen
        self.held_out = held_out  # distillation's held-out chunks (passes/distill.py split_holdout)
        self.dropped = dropped
        self.footprint = Footprint(spec, [n for n, _ in traced.gm_a.named_parameters()])
        self.fake_check = fake_check_pays(traced.forward_seconds, traced.gm_a)  # how merged graphs are checked

    def model(self, widths: dict[int, int], t: Timer) -> tuple[fx.GraphModule, list[str], dict]:
        """The widened, filled merged model at these widths (eval mode), its notes and plans."""
        return self.models([widths], [t])[0]

    def models(self, all_widths: list[dict[int, int]], timers: list[Timer]
               ) -> list[tuple[fx.GraphModule, list[str], dict]]:
        """`model` for several budgets' widths, filled together: merged-input least squares runs
        every budget's merged model in lockstep (passes/fill.py `fill_models`)."""
        built = [self._emit(widths, t) for widths, t in zip(all_widths, timers)]
        start = time.perf_counter()
        inputs = None
        if self.opts.merged_inputs:
            leading = leading_batches(self.batches)
            top_up = ((lambda samples: top_up_batches(self.batches[len(leading):], leading, samples, self.opts.seed))
                      if self.opts.mixup and self.opts.user_data else None)
            inputs = MergedInputOptions(leading, self.opts.positions, self.opts.seed, self.opts.stats_dtype, top_up)
        notes = fill_models([(merged, spec, p) for merged, spec, p, _, _ in built], self.traced.gm_a, self.traced.gm_b,
                            self.weights, self.stats, ridge=self.opts.ridge, solve=self.opts.method.solve,
                            merged_inputs=inputs, exact=[self._exact(plans) for _, _, _, plans, _ in built])
        seconds = time.perf_counter() - start
        out = []
        for (merged, _, _, plans, dense_notes), more, t in zip(built, notes, timers):
            t["fill"] = t.get("fill", 0.0) + seconds  # shared by the budgets filled together
            if self.head is not None:
                self.head.split_output(merged)
            out.append((merged.eval(), dense_notes + more, plans))
        return out

    def _exact(self, plans: dict) -> bool:
        """No feature pair merged and no hidden unit frozen: the merged network is the ensemble."""
        return not self.frozen.frozen_units and all(plans[g.id].merged_pairs == 0 for g in self.spec.mergeable())

    def _emit(self, widths: dict[int, int], t: Timer):
        """The widened (and compact) merged graph of one budget, before its weights are filled."""
        plans = methods.plans_for(self.spec, self.match, widths, self.opts.frozen)
        spec, w, p = self.spec, widths, plans
        if self.head is not None:
            spec, w, p = self.head.spec, self.head.widths(widths), self.head.plans(plans)
        with t("widen"):
            merged = widen(self.traced.gm_a, spec, w)
            if self.opts.layernorm == "per_model":
                per_model_layernorms(merged, spec, p)
            scale_tied_embeddings(merged, spec, p)
        dense_notes = []
        if self.opts.emit == "compact":
            with t("compact"):
                emitted = compact(merged, spec, p)
            merged, dense_notes = emitted.gm, emitted.notes
            if dense_notes:
                log.info("%d weight(s) kept dense: %s", len(dense_notes), "; ".join(dense_notes))
        if self.opts.merged_inputs:  # fill runs the emitted graph: a graph that cannot run is a bug of ours
            with t("widen"):
                check_graph(merged, self.traced.example_args, fake=self.fake_check)
        return merged, spec, p, plans, dense_notes

    def budget(self, budget: float, widths: dict[int, int], t: Timer, built=None) -> fx.GraphModule:
        merged, notes, plans = built if built is not None else self.model(widths, t)
        opts = self.opts
        if opts.repair:
            with t("repair"):
                methods.repair_batchnorm(merged, self.batches)
        distilled = None
        if opts.distill:
            with t("distill"):
                distilled = distill(merged, self.traced.gm_a, self.traced.gm_b, self.batches, self.held_out,
                                    opts.distill, opts.distill_lr, separate=self.head is not None, exact=self._exact(plans),
                                    seed=opts.seed, progress=opts.progress)
        with t("verify"):
            limit = budget if opts.allocation.budget_metric == "params" else 2.0
            # what the emitted model stores: its structural count (both heads when separate), plus
            # the zero blocks of layers kept dense
            spec_e, plans_e = (self.head.spec, self.head.plans(plans)) if self.head else (self.spec, plans)
            expected = (structural_parameters(spec_e, plans_e, self.footprint.parameter_names)
                        + stored_zeros(merged, spec_e, plans_e))
            parameters = verify_merged(merged, self.traced.example_args, self.footprint, self.spec, plans, widths, limit,
                                       expected_stored=expected, fake=self.fake_check)
        merged.eval()
        report = merge_report(spec=self.spec, widths=widths, plans=plans, match=self.match, budget=budget,
                              parameters=parameters, parameters_one_model=self.footprint.base, merged=merged,
                              stats=self.stats, notes=self.weights.notes + notes, timings=dict(t))
        report.update({"method": opts.method.name, "solve": opts.method.solve, "heads": opts.heads,
                       "least_squares": opts.least_squares if opts.method.solve == "least_squares" else None,
                       "repair": opts.repair, "data": opts.data_kind,
                       "extra_head_parameters": self.head.extra_parameters if self.head else 0,
                       "frozen_hidden": self.frozen.to_dict(), "dropped_sites": self.dropped,
                       "distill": distilled})
        merged.meta["pleas_fx"] = report
        return merged
