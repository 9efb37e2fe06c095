"""Fuzzing pleas_fx.merge with random networks (the command line is tools/fuzz_nets.py).

Every net is an fx-traceable nn.Module with static Python control flow, drawn from a seed
(same seed, same architecture; the weights of model A and model B come from two more seeds).
Categories:

  mlp          Linear stacks: activations (module and functional, PReLU), BatchNorm1d /
               LayerNorm / F.layer_norm, residual blocks (identity or projection), SwiGLU (chunk
               or split on the feature axis), dropout (module and functional).
  cnn1d, cnn2d conv (+BatchNorm, dilation, PReLU), pre-activation BN-ReLU-conv, residual add (identity or
               projection shortcut, `+`, torch.add, Tensor.add), channel concat of branches
               (DenseNet style too, negative cat dims) or stacked and summed, chunk / split /
               slicing of channels (then cat, add or GLU),
               squeeze-excitation gates (pooled -> 1x1 conv or Linear -> sigmoid -> multiply),
               an SE-gated concat added to a residual, depthwise (with channel multiplier) and
               grouped convs, max / avg / adaptive pooling and upsampling (module and functional),
               InstanceNorm, GroupNorm, F.batch_norm / F.layer_norm / F.group_norm with registered
               parameters, channels-last Linear, and flatten / view / reshape / pooled heads (one
               returns a tuple holding a dict).
  transformer  token models: embedding, linear-token, linear-patch (reshape/permute patchify
               with sizes read from x.shape) or conv-patch stems; cls token and position
               embedding; pre-norm, post-norm or norm-free blocks; attention as fused qkv
               (`reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)`), separate q/k/v,
               F.scaled_dot_product_attention or explicit softmax(q @ k^T * scale) @ v,
               nn.MultiheadAttention (batch first or not); an optional key-padding mask input;
               MLP blocks; cls / mean / token heads, the token head sometimes tied to the embedding.
  unknown      one of the above with one or two ops pleas_fx cannot know inserted: a function
               wrapped with torch.fx.wrap, a custom leaf module (traced with a custom tracer),
               rarer torch ops (cumsum, roll, flip, sort, topk, einsum, cummax, index_select
               with a fixed permutation, F.normalize, ...), or, rarely, data-dependent control
               flow (untraceable: pleas_fx must refuse it with a TraceError).

For each net (inputs shaped and typed for the net; calibration data = 2 batches of 8):

  a. self-merge: merge(model, permuted copy, 1.0, data), where the copy permutes every inferred
     group (passes.verify.random_permutations + permute_model). The permuted copy must compute
     the model's function (< 1e-5 relative: else a group-soundness bug) and the merged model
     too (< 1e-4).
  b. merge(model_a, model_b, budgets, data): outputs finite at every budget; at budget 2 the
     merged output is the mean of the two models' outputs (< 1e-4) where no hidden group is
     frozen and every normalisation acts per channel ("not checked" otherwise); stored
     parameters relative to one model; model_a and model_b unchanged; a second identical
     merge gives identical outputs.

Outputs are checked on the example input (batch 4) and on a batch of another size (5); about 8%
of the MLPs and CNNs are float64. The frozen share of hidden units is read from the groups the
library infers (groups not fixed by the structure: network input/output, batch, spatial...);
merged.meta["pleas_fx"]["frozen"] is kept in the --json records.
Outcomes: ok; refused (a documented PleasError about the user's model, raised at the front
door: tracing, budget or data checks); internal (any other exception, or a PleasError raised
by the compiler after tracing succeeded); wrong (a check failed).

Modules: layers and cnn_layers (the blocks nets are made of), configs (random configs per
category), nets (modules and inputs from a config), checks (run_net and its record),
campaign (many seeds and the report).
"""
import torch

torch.set_num_threads(1)
