"""Models of other libraries × recipes, called the way their users call them; the libraries are
no dependency of fx-sparsify, so each one that is not installed is listed as such.

    pip install segmentation-models-pytorch monai vit-pytorch x-transformers efficientnet_pytorch torchaudio
    .venv/bin/python benchmarks/other_libraries.py                         # every installed library
    .venv/bin/python benchmarks/other_libraries.py --only monai --recipes st3 tl1

For each (model, recipe): the model from a tiny config, ``sparsify`` (train mode, ``total_steps=4``,
example inputs), three SGD steps on the mean square of its output plus ``sparsify.penalty``
with ``sparsify.step``, ``sparsify.report``, ``sparsify.finalize`` with its output check, and the
finalized model against the sparse one in eval on another batch. A cell: ``ok``, how many sites
the recipe rewrote, how many submodules torch.fx could not trace and whether ``finalize`` warned
(``ok, 13 rewritten, 2 untraceable``), or the stage and the first line of the error.
docs/integrations.md holds the last table.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import time
import traceback
import warnings

import torch

import sparsify
from sparsify.core.state import find_state

RECIPES = ["st3", "tl1", "nm-2-4", "dual", "semi-structured", "sas"]


def _img(c=3, s=64, d=2):
    return torch.randn(2, c, *(s,) * d, generator=torch.Generator().manual_seed(s))


def _wav2vec2():
    """A tiny wav2vec2 with its positional conv's weight_norm removed first, as
    docs/integrations.md says (a computed weight stays dense otherwise)."""
    m = importlib.import_module("torchaudio.models").wav2vec2_model(
        extractor_mode="group_norm", extractor_conv_layer_config=[(32, 10, 5), (32, 3, 2), (32, 2, 2)],
        extractor_conv_bias=False, encoder_embed_dim=64, encoder_projection_dropout=0.0, encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4, encoder_attention_dropout=0.0,
        encoder_ff_interm_features=128, encoder_ff_interm_dropout=0.0, encoder_dropout=0.0,
        encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=20)
    conv = m.encoder.transformer.pos_conv_embed.conv
    if hasattr(conv, "parametrizations"):
        torch.nn.utils.parametrize.remove_parametrizations(conv, "weight")
    else:  # the legacy weight_norm hook
        torch.nn.utils.remove_weight_norm(conv)
    return m


def _models():
    """``{(library, model): (build, example)}``: ``build()`` imports lazily (ImportError: absent)."""
    smp = lambda: importlib.import_module("segmentation_models_pytorch")  # noqa: E731
    monai = lambda: importlib.import_module("monai.networks.nets")  # noqa: E731
    vp = lambda sub: importlib.import_module(f"vit_pytorch{sub}")  # noqa: E731
    xt = lambda: importlib.import_module("x_transformers")  # noqa: E731
    ta = lambda: importlib.import_module("torchaudio.models")  # noqa: E731
    g = torch.Generator().manual_seed(0)
    return {
        ("segmentation_models_pytorch", "Unet resnet18"): (lambda: smp().Unet("resnet18", encoder_weights=None, classes=3), _img()),
        ("segmentation_models_pytorch", "FPN mobilenet_v2"): (lambda: smp().FPN("mobilenet_v2", encoder_weights=None, classes=3), _img()),
        ("segmentation_models_pytorch", "DeepLabV3Plus resnet18"): (lambda: smp().DeepLabV3Plus("resnet18", encoder_weights=None, classes=3), _img()),
        ("segmentation_models_pytorch", "Segformer mit_b0"): (lambda: smp().Segformer("mit_b0", encoder_weights=None, classes=3), _img()),
        ("monai", "UNet 3-D"): (lambda: monai().UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2), _img(1, 16, 3)),
        ("monai", "SegResNet 3-D"): (lambda: monai().SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2), _img(1, 16, 3)),
        ("monai", "UNETR"): (lambda: monai().UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4), _img(1, 32, 3)),
        ("monai", "SwinUNETR 2-D"): (lambda: monai().SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2), _img(1, 64)),
        ("monai", "DynUNet 3-D"): (lambda: monai().DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2]), _img(1, 16, 3)),
        ("vit-pytorch", "ViT"): (lambda: vp("").ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128), _img(s=32)),
        ("vit-pytorch", "DeepViT"): (lambda: vp(".deepvit").DeepViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128), _img(s=32)),
        ("vit-pytorch", "MaxViT"): (lambda: vp(".max_vit").MaxViT(num_classes=10, dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1), window_size=2), _img(s=32)),
        ("vit-pytorch", "CvT"): (lambda: vp(".cvt").CvT(num_classes=10), _img(s=32)),
        ("x-transformers", "ViTransformerWrapper"): (lambda: xt().ViTransformerWrapper(image_size=16, patch_size=4, num_classes=10, attn_layers=xt().Encoder(dim=32, depth=2, heads=4)), _img(s=16)),
        ("x-transformers", "TransformerWrapper (decoder)"): (lambda: xt().TransformerWrapper(num_tokens=64, max_seq_len=16, attn_layers=xt().Decoder(dim=32, depth=2, heads=4)), torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))),
        ("torchaudio", "wav2vec2 (weight_norm removed)"): (_wav2vec2, torch.randn(2, 1600, generator=g)),
        ("torchaudio", "Conformer"): (lambda: ta().Conformer(input_dim=32, num_heads=4, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=7), (torch.randn(2, 20, 32, generator=g), torch.tensor([20, 15]))),
        ("torchaudio", "Emformer"): (lambda: ta().Emformer(input_dim=32, num_heads=4, ffn_dim=64, num_layers=2, segment_length=4, right_context_length=1), (torch.randn(2, 13, 32, generator=g), torch.tensor([13, 10]))),
        ("torchaudio", "ConvTasNet"): (lambda: ta().ConvTasNet(num_sources=2, enc_kernel_size=16, enc_num_feats=32, msk_kernel_size=3, msk_num_feats=16, msk_num_hidden_feats=32, msk_num_layers=2, msk_num_stacks=1), torch.randn(2, 1, 800, generator=g)),
        ("torchaudio", "Wav2Letter"): (lambda: ta().Wav2Letter(num_classes=20, input_type="mfcc", num_features=13), torch.randn(2, 13, 100, generator=g)),
        ("torchaudio", "DeepSpeech"): (lambda: ta().DeepSpeech(n_feature=20, n_hidden=32, n_class=10), torch.randn(2, 1, 30, 20, generator=g)),
        ("efficientnet_pytorch", "EfficientNet-B0"): (lambda: importlib.import_module("efficientnet_pytorch").EfficientNet.from_name("efficientnet-b0", num_classes=10), _img()),
    }


def run(build, x, recipe: str) -> str:
    stage = "build"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            model = build().train()
            stage = "sparsify"
            xs = x if isinstance(x, tuple) else (x,)  # several inputs (audio and its lengths)
            m = sparsify.sparsify(model, recipe, total_steps=4, example_inputs=xs)
            opt = torch.optim.SGD(sparsify.param_groups(m, 1e-4), lr=1e-3)
            stage = "train"
            for _ in range(3):
                out = m(*xs)
                loss = (out[0] if isinstance(out, (tuple, list)) else out).float().square().mean() + sparsify.penalty(m)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sparsify.step(m, loss.detach())
            stage = "report"
            sparsify.report(m)
            stage = "finalize"
            m.eval()
            final = sparsify.finalize(m, xs)
            if isinstance(x, tuple):  # each input's batch reversed: lengths stay with their audio
                other = tuple(t.flip(0) for t in x)
            else:
                other = (x.flip(0) if x.is_floating_point() else (x + 1) % int(x.max() + 1),)
            with torch.no_grad():
                a, b = final(*other), m(*other)
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        plan = find_state(m).plan
        n = len(plan.fallbacks)
        warned = any(type(w.message).__name__ == "FinalizeWarning" for w in caught)
        return (f"ok, {len(plan.rewritten)} rewritten" + (f", {n} untraceable" if n else "")
                + (", finalize warned" if warned else ""))
    except ImportError as exc:
        raise exc
    except Exception as exc:  # a cell of the table, not a crash of the run
        return f"{stage}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:80] if str(exc).strip() else ''}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="libraries (default: every one listed)")
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}; {', '.join(args.recipes)}\n")
    print("| library | model | " + " | ".join(args.recipes) + " |")
    print("|---|---|" + "---|" * len(args.recipes))
    for (library, name), (build, x) in _models().items():
        if args.only and library not in args.only:
            continue
        t = time.perf_counter()
        try:
            importlib.import_module(library.replace("-", "_"))
            version = importlib.metadata.version(library)
            cells = [run(build, x, r) for r in args.recipes]
        except ImportError:
            print(f"| {library} | {name} | not installed |" + " |" * (len(args.recipes) - 1), flush=True)
            continue
        except Exception:
            traceback.print_exc()
            raise
        print(f"| {library} {version} | {name} | " + " | ".join(cells) + f" |  <!-- {time.perf_counter() - t:.0f} s -->",
              flush=True)


if __name__ == "__main__":
    main()
