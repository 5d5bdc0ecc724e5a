"""Compute an official OpenVision 2 trajectory case with the official JAX code.

Runs OUTSIDE this repository's environment, in a venv with the official code's stack
(Python 3.11, jax==0.4.38 jaxlib==0.4.38 flax==0.10.2 optax==0.2.5 ml_collections einops
absl-py; CPU, fp32), pointed at a checkout of UCSC-VLAA/OpenVision (commit 6c24e45):

    mkdir -p /tmp/ov2/OpenVision
    git -C <mirror of UCSC-VLAA/OpenVision> archive 6c24e45 src | tar -x -C /tmp/ov2/OpenVision
    /tmp/ov2/venv/bin/python tools/make_official_trajectory.py \
        --official /tmp/ov2/OpenVision --out DIR \
        --seed 7 --batch 6 --res 40 --patch 8 --keep-ratio 0.25 --vocab 50 --token-len 10 \
        --base-lr 0.064 --warmup 1 --total-steps 7 --steps 4 \
        --width 48 --mlp 96 --dwidth 48 --dmlp 96

(tests/fixtures/openvision2_official_trajectory_case2/); the defaults with
`--batches-from tests/fixtures/openvision2_official_trajectory/batches.npz` reproduce the
shared fixture openvision2_official_trajectory/ bit for bit (every .npz array and meta.json).
It writes DIR laid out like tests/fixtures/openvision2_official_trajectory/ (meta.json,
params0.npz, batches.npz, official_mu_fp32.npz, official_mu_bf16.npz; see its README).

What comes from the official code (imported from --official, or its text executed verbatim):
- the config: `src/configs/openvision2.py get_config` with res / batch_factor (= batch / 16384)
  / base_lr / token_len / keep_ratio / vocab_size, so `config.lr = base_lr x 64 x batch_factor`
  (= base_lr x batch / 256) and the optimizer fields (scale_by_adam, b1 0.9, b2 0.95,
  mu_dtype bfloat16, wd 0.2, cosine schedule with min_lr 0, coca_caption_loss_weight 2,
  loss_use_global_batch, cpu_unit8) are the file's own. Overridden for the tiny case: the ViT
  and decoder sizes, `total_steps`, the schedule's `warmup_steps`, `init_shapes` and (second
  run) `optax.mu_dtype='float32'`. The config's decoder key `num_classes` is given as
  `vocab_size`, the field text_decoder_v2._Model actually has (with `num_classes` the
  official Model cannot be constructed).
- the model `models.openvision2_model.Model(**config.model, mesh=mesh)` (ViT `vit` and decoder
  `text_decoder_v2`, fusion 'concat', causal mask) and its initialisation;
- `optim.make(config, params_unboxed_shape, sched_kw=...)` as main_openvision2.py calls it;
- main_openvision2.py's nested `init` and `update_fn` (loss, grads, tx.update, apply_updates,
  measurements), whose source is cut out of main() with `ast` and executed unchanged; the
  jit decorator (shardings and donation for a TPU mesh) is replaced by a plain `jax.jit`;
  run, as main does, under `with mesh, nn.logical_axis_rules(...)` on a 1x1x1 mesh.
- One patch to the official code (patch_decoder_depth): text_decoder_v2 with
  fusion_style='concat' does not pass `depth` to text_transformer.Encoder, a required field,
  so the official Model cannot be built as published; the decoder's own depth is passed.
- The RNG flow of main: jax_threefry_partitionable, prng impl unsafe_rbg,
  rng = PRNGKey(seed); rng, rng_init = split(rng); params = jit(init)(rng_init);
  opt = jit(tx.init)(params); rng, rng_loop = split(rng, 2); update_fn(state, batch, rng_loop).

The kept-token indices are those the official model draws inside update_fn. They are read
by a second forward of the official model with the same parameters and rng key
(fold_in(rng_loop, step count), as update_fn does), in which a flax method interceptor
replaces the ViT's patch tokens by their index (the draw does not depend on the values) and
records what the decoder receives as `context`.

Data: uint8 images and captions drawn with numpy (RandomState(seed)), or taken from
--batches-from (a batches.npz with images_uint8, labels, autoreg_labels, cap_loss_mask, such
as the shared fixture's). The images go to update_fn as uint8 (config.cpu_unit8, as the
official pipeline feeds them) and `images` in batches.npz is update_fn's normalisation
(float32 ImageNet mean/std). Captions: BOS 1, pieces (ids 4..vocab-1), EOS 2, PAD 0 to
token_len - 1 slots, then token 3 appended (the official tokenizer's [CLS]).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import textwrap
import types

OFFICIAL_FILES = (
    "src/configs/openvision2.py", "src/configs/common.py", "src/optim/build_optax.py",
    "src/optim/__init__.py", "src/main_openvision2.py", "src/models/openvision2_model.py",
    "src/models/vit.py", "src/models/text_decoder_v2.py", "src/models/text_transformer.py",
    "src/models/common.py", "src/losses/common.py", "src/helpers/utils.py")
PAD, BOS, EOS, APPENDED = 0, 1, 2, 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="OpenVision checkout (holds src/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="config.seed (and the data draw)")
    p.add_argument("--data-seed", type=int, default=None, help="numpy data draw (default: seed)")
    p.add_argument("--batches-from", default=None,
                   help="take images_uint8 / labels / autoreg_labels / cap_loss_mask from this npz")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=48)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=128)
    p.add_argument("--dwidth", type=int, default=64)
    p.add_argument("--ddepth", type=int, default=2)
    p.add_argument("--dheads", type=int, default=2)
    p.add_argument("--dmlp", type=int, default=128)
    p.add_argument("--vocab", type=int, default=40)
    p.add_argument("--token-len", type=int, default=12)
    p.add_argument("--keep-ratio", type=float, default=0.35)
    p.add_argument("--base-lr", type=float, default=0.128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--total-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--image-remat", default=None,
                   help="override config.model.image.remat_policy (default: the config's)")
    return p.parse_args(argv)


def import_official(root: str):
    """sys.path as the official code expects it: the checkout (for `src.` imports) and src/
    (for `models.`, `optim`, `losses`, `configs.`)."""
    # flax.io picks its file backend by looking for tensorflow: import it before the stub
    # below exists, so that it takes its plain-Python backend.
    import flax.io  # noqa: F401
    import flax.training.checkpoints  # noqa: F401

    # STUB: src/helpers/utils.py imports `tensorflow.io.gfile` at top level; only its
    # checkpoint / metric file helpers use it, none of which run here, so tensorflow is not
    # installed and an empty module stands in for it.
    tf = types.ModuleType("tensorflow")
    tf.io = types.ModuleType("tensorflow.io")
    tf.io.gfile = types.ModuleType("tensorflow.io.gfile")
    sys.modules.update({"tensorflow": tf, "tensorflow.io": tf.io,
                        "tensorflow.io.gfile": tf.io.gfile})
    for path in (os.path.join(root, "src"), root):
        if path not in sys.path:
            sys.path.insert(0, path)


def official_nested_functions(main_path: str, names=("init", "update_fn")) -> dict[str, str]:
    """Source of functions nested in main() of main_openvision2.py, decorators left out."""
    with open(main_path) as f:
        source = f.read()
    main = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    found = {}
    for node in ast.walk(main):
        if isinstance(node, ast.FunctionDef) and node.name in names and node.name not in found:
            found[node.name] = textwrap.dedent(ast.get_source_segment(source, node, padded=True))
    missing = set(names) - set(found)
    assert not missing, f"not found in {main_path}: {missing}"
    return found


def make_config(args, mu_dtype: str):
    import configs.openvision2 as ov2_config  # official

    batch_factor = args.batch / (1024 * 16)
    arg = (f"res={args.res},batch_factor={batch_factor!r},base_lr={args.base_lr!r},"
           f"token_len={args.token_len},keep_ratio={args.keep_ratio!r},vocab_size={args.vocab},"
           "data_parallelism=1,fsdp_parallelism=1,tensor_parallelism=1")
    config = ov2_config.get_config(arg)
    # Tiny model in place of L/16 + decoder 'L' (sizes given explicitly, variant dropped).
    image = config.model.image.to_dict()
    image.pop("variant")
    image.update(width=args.width, depth=args.depth, mlp_dim=args.mlp, num_heads=args.heads,
                 patch_size=(args.patch, args.patch))
    if args.image_remat is not None:
        image["remat_policy"] = args.image_remat
    dec = config.model.text_decoder_config.to_dict()
    dec.pop("variant")
    dec["vocab_size"] = dec.pop("num_classes")  # the field text_decoder_v2._Model has
    dec.update(width=args.dwidth, depth=args.ddepth, mlp_dim=args.dmlp, num_heads=args.dheads)
    config.model.image = image
    config.model.text_decoder_config = dec
    config.init_shapes = [(args.batch, args.res, args.res, 3), (args.batch, args.token_len)]
    config.total_steps = args.total_steps
    assert len(config.schedule) == 1 and config.schedule[0][0] == ".*"
    config.schedule = [(".*", dict(config.schedule[0][1], warmup_steps=args.warmup))]
    config.optax = dict(config.optax, mu_dtype=mu_dtype)
    return config, batch_factor


def draw_data(args):
    import numpy as np

    if args.batches_from:
        with np.load(args.batches_from) as data:
            out = {k: data[k] for k in ("images_uint8", "labels", "autoreg_labels",
                                        "cap_loss_mask")}
        want = (args.steps, args.batch)
        assert out["images_uint8"].shape == want + (args.res, args.res, 3), out["images_uint8"].shape
        assert out["labels"].shape == want + (args.token_len,), out["labels"].shape
        return out
    rs = np.random.RandomState(args.seed if args.data_seed is None else args.data_seed)
    steps, b, length = args.steps, args.batch, args.token_len
    images = rs.randint(0, 256, size=(steps, b, args.res, args.res, 3)).astype(np.uint8)
    labels = np.zeros((steps, b, length), np.int32)
    for s in range(steps):
        for i in range(b):
            n = rs.randint(1, length - 2)  # pieces; BOS + pieces + EOS fill <= length - 1 slots
            labels[s, i, 0] = BOS
            labels[s, i, 1:1 + n] = rs.randint(4, args.vocab, size=n)
            labels[s, i, 1 + n] = EOS
    labels[:, :, -1] = APPENDED
    autoreg = np.concatenate([labels[:, :, 1:length - 1],
                              np.full((steps, b, 1), PAD, np.int32)], axis=2)
    mask = (autoreg != PAD).astype(np.int32)
    return dict(images_uint8=images, labels=labels, autoreg_labels=autoreg, cap_loss_mask=mask)


def flat(tree) -> dict:
    import numpy as np
    from flax.traverse_util import flatten_dict

    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def run(args, mu_dtype: str, data: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax  # noqa: F401  (update_fn's namespace)
    from flax import linen as nn
    from flax.linen import partitioning as nn_partitioning
    from jax.sharding import Mesh

    import losses  # official (main: `import losses`)
    import optim  # official (main: `import optim`)
    from helpers.sharding import unbox_logicallypartioned  # official
    import models.openvision2_model as model_mod  # official (config.model_name)

    patch_decoder_depth()
    config, batch_factor = make_config(args, mu_dtype)
    assert config.model_name == "openvision2_model"
    config.seed = args.seed
    rng = jax.random.PRNGKey(  # as main()
        jax.device_put(config.get("seed", 0), jax.local_devices(backend="cpu")[0]))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), config.sharding.mesh_axes)
    model = model_mod.Model(**config.get("model", {}), mesh=mesh)

    sources = official_nested_functions(os.path.join(args.official, "src", "main_openvision2.py"))
    namespace = dict(jax=jax, jnp=jnp, optax=optax, optim=optim, losses=losses, config=config,
                     model=model)
    exec(sources["init"], namespace)  # noqa: S102 (official source, verbatim)
    init = namespace["init"]

    rng, rng_init = jax.random.split(rng)
    with nn_partitioning.axis_rules(config.sharding.logical_axis_rules):
        params_shape = jax.eval_shape(init, rng_init)
    params_unboxed_shape = unbox_logicallypartioned(params_shape)
    tx, sched_fns = optim.make(config, params_unboxed_shape,
                               sched_kw=dict(total_steps=config.total_steps,
                                             batch_size=args.batch,
                                             data_size=args.batch * args.total_steps))
    namespace["tx"] = tx
    exec(sources["update_fn"], namespace)  # noqa: S102 (official source, verbatim)
    update_fn = jax.jit(namespace["update_fn"])

    with mesh, nn_partitioning.axis_rules(config.sharding.logical_axis_rules):
        params = jax.jit(init)(rng_init)
        opt = jax.jit(tx.init)(params)
    params = unbox_logicallypartioned(params)
    opt = unbox_logicallypartioned(opt)
    rng, rng_loop = jax.random.split(rng, 2)
    state = {"params": params, "opt": opt}
    params0 = flat(jax.device_get(params))

    out = dict(params0=params0, steps=[], keep_idx=[], images=[], config=config,
               batch_factor=batch_factor, per_step={k: [] for k in
               ("loss", "caption_loss", "lr", "l2_grads", "l2_updates")})
    assert config.get("cpu_unit8", False)
    for s in range(args.steps):
        batch = {"image": jnp.asarray(data["images_uint8"][s]),
                 "labels": jnp.asarray(data["labels"][s]),
                 "autoreg_labels": jnp.asarray(data["autoreg_labels"][s]),
                 "cap_loss_mask": jnp.asarray(data["cap_loss_mask"][s])}
        count = optim.get_count(state["opt"], jittable=True)
        out["keep_idx"].append(drawn_keep_idx(model, state["params"], batch, rng_loop, count,
                                              mesh, config))
        out["images"].append(np.asarray(normalised(batch["image"])))
        out["per_step"]["lr"].append(
            float(np.float32(sched_fns[0](int(count)))) * config.lr)
        with mesh, nn.logical_axis_rules(config.sharding.logical_axis_rules):
            state, measurements = update_fn(state, batch, rng_loop)
        m = jax.device_get(measurements)
        out["per_step"]["loss"].append(float(m["training_loss"]))
        for key in ("caption_loss", "l2_grads", "l2_updates"):
            out["per_step"][key].append(float(m[key]))
        out["steps"].append(flat(jax.device_get(state["params"])))
        print(f"[{mu_dtype}] step {s + 1} loss {out['per_step']['loss'][-1]:.9g} "
              f"lr {out['per_step']['lr'][-1]:.9g}", flush=True)
    return out


def patch_decoder_depth() -> None:
    """PATCH (the one change to the official code's behaviour): with fusion_style='concat',
    text_decoder_v2._Model builds `Encoder(name="Transformer", **self.get_transformer_kwargs())`
    but get_transformer_kwargs() leaves out `depth`, a required field of
    text_transformer.Encoder, so the official model cannot be built at all (TypeError:
    missing 'depth'). The decoder's own `depth` is added to those kwargs; nothing else
    changes ('cross_attn' fusion passes depth itself and is not used here)."""
    import models.text_decoder_v2 as dec  # official (the module openvision2_model imports)

    if getattr(dec._Model.get_transformer_kwargs, "_with_depth", False):
        return
    official = dec._Model.get_transformer_kwargs

    def get_transformer_kwargs(self) -> dict:
        kwargs = official(self)
        assert "depth" not in kwargs
        return {"depth": self.depth, **kwargs} if self.fusion_style == "concat" else kwargs

    get_transformer_kwargs._with_depth = True
    dec._Model.get_transformer_kwargs = get_transformer_kwargs


def normalised(images):
    """update_fn's `cpu_unit8` normalisation (the same expression as main_openvision2.py)."""
    import jax.numpy as jnp

    mean = jnp.asarray([0.485 * 255, 0.456 * 255, 0.406 * 255])[None, None, None, :]
    std = jnp.asarray([0.229 * 255, 0.224 * 255, 0.225 * 255])[None, None, None, :]
    return (jnp.asarray(images, dtype=jnp.float32) - mean) / std


def drawn_keep_idx(model, params, batch, rng_loop, count, mesh, config):
    """The patch indices the official model keeps in update_fn for this step: the same
    forward and rng key, with the ViT's patch tokens replaced by their index (the draw does
    not look at them), reading what the decoder receives as its image context."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    rng_key = jax.random.fold_in(rng_loop, count)  # as update_fn
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        name = context.module.name
        if context.method_name == "__call__" and name == "img_encoder":
            pooled, tokens = next_fun(*args, **kwargs)
            index = jnp.arange(tokens.shape[1], dtype=tokens.dtype)[None, :, None]
            return pooled, jnp.broadcast_to(index, tokens.shape)
        if context.method_name == "__call__" and name == "txt_decoder":
            seen["context"] = kwargs["context"]
        return next_fun(*args, **kwargs)

    with mesh, nn.logical_axis_rules(config.sharding.logical_axis_rules):
        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, normalised(batch["image"]), batch["labels"],
                        train=True, rngs={"dropout": rng_key, "drop_path": rng_key,
                                          "random_mask": rng_key})
    ctx = np.asarray(seen["context"])
    assert np.all(ctx == ctx[:, :, :1]), "context is not the index-valued tokens"
    return np.rint(ctx[:, :, 0]).astype(np.int64)


def decay_split(config, params0: dict):
    """Which parameters the official optimizer decays: its own wd mask (wd_mults default)."""
    import numpy as np
    import src.optim.build_optax as build_optax  # official (what `optim` star-imports)
    from flax.traverse_util import unflatten_dict

    tree = unflatten_dict({tuple(k.split("/")): v for k, v in params0.items()})
    wd_mults = config.get("wd_mults", [(".*/kernel$", 1.0)])
    masks, mults = build_optax._make_mask_trees(tree, wd_mults, None)
    decayed = set()
    for mask, mult in zip(masks, mults):
        for k, v in flat(mask).items():
            if bool(np.asarray(v)) and config.wd * mult != 0:
                decayed.add(k)
    return sorted(decayed), sorted(set(params0) - decayed)


def main(argv=None) -> None:
    args = parse_args(argv)
    import_official(args.official)
    import jax

    # main_openvision2.py: module level, then first thing in main().
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    import flax
    import numpy as np
    import optax

    data = draw_data(args)
    runs = {dtype: run(args, dtype, data) for dtype in ("bfloat16", "float32")}
    bf, fp = runs["bfloat16"], runs["float32"]
    for k in fp["params0"]:
        assert np.array_equal(fp["params0"][k], bf["params0"][k]), k
    for a, b in zip(fp["keep_idx"], bf["keep_idx"]):
        assert np.array_equal(a, b)

    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "params0.npz"), **fp["params0"])
    np.savez(os.path.join(args.out, "batches.npz"),
             images_uint8=data["images_uint8"].astype(np.uint8),
             labels=data["labels"].astype(np.int32),
             autoreg_labels=data["autoreg_labels"].astype(np.int32),
             cap_loss_mask=data["cap_loss_mask"].astype(np.int32),
             images=np.stack(fp["images"]).astype(np.float32),
             keep_idx=np.stack(fp["keep_idx"]).astype(np.int64))
    for dtype, name in (("float32", "official_mu_fp32.npz"), ("bfloat16", "official_mu_bf16.npz")):
        r = runs[dtype]
        arrays = {f"step{s + 1}/{k}": v.astype(np.float32)
                  for s, params in enumerate(r["steps"]) for k, v in params.items()}
        arrays.update({f"per_step/{k}": np.asarray(v, np.float64)
                       for k, v in r["per_step"].items()})
        np.savez(os.path.join(args.out, name), **arrays)

    config = bf["config"]
    decayed, not_decayed = decay_split(config, fp["params0"])
    geom_patches = (args.res // args.patch) ** 2
    meta = {
        "B": args.batch, "RES": args.res, "PATCH": args.patch, "WIDTH": args.width,
        "DEPTH": args.depth, "MLP": args.mlp, "HEADS": args.heads, "DW": args.dwidth,
        "DD": args.ddepth, "DMLP": args.dmlp, "DHEADS": args.dheads, "VOCAB": args.vocab,
        "TOKEN_LEN": args.token_len, "PAD": PAD, "keep_ratio": args.keep_ratio,
        "num_kept": int(geom_patches * args.keep_ratio), "steps": args.steps,
        "total_steps": args.total_steps, "warmup_steps": args.warmup,
        "config": {
            "lr": config.lr, "wd": config.wd, "optax_name": config.optax_name,
            "optax": {"b1": config.optax["b1"], "b2": config.optax["b2"],
                      "mu_dtype": config.optax["mu_dtype"]},
            "schedule": [[pattern, dict(settings)] for pattern, settings in config.schedule],
            "grad_clip_norm": config.get("grad_clip_norm"),
            "wd_mults": config.get("wd_mults"),
            "coca_caption_loss_weight": config.coca_caption_loss_weight,
            "seed": args.seed, "batch_size": config.input.batch_size,
            "base_lr": args.base_lr, "batch_factor": bf["batch_factor"],
        },
        "weight_decayed": decayed, "not_weight_decayed": not_decayed,
        **{key: {dtype: runs[dtype]["per_step"][src] for dtype in ("bfloat16", "float32")}
           for key, src in (("losses", "loss"), ("caption_losses", "caption_loss"),
                            ("lr", "lr"), ("l2_grads", "l2_grads"))},
        "official_code": "UCSC-VLAA/OpenVision @ 6c24e4510796ab503f7f577f2e526c224f6a0fde",
        "official_files_sha256": {
            rel: hashlib.sha256(open(os.path.join(args.official, rel), "rb").read()).hexdigest()
            for rel in OFFICIAL_FILES},
        "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
        "prng_impl": "unsafe_rbg",
    }
    assert meta["config"]["batch_size"] == args.batch, meta["config"]["batch_size"]
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
