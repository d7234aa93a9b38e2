"""The hot paths on a CUDA device: training step (fp32 and bf16 autocast), Fisher scoring, layer scores,
sparse update. Marked `cuda` and skipped without a GPU (run_scripts/gpu_check.sh runs `pytest -m cuda`).
The GPU mapping file is checked everywhere."""
from pathlib import Path

import peft
import pytest
import torch
import yaml
from tiny import tiny_batch, tiny_model, tiny_texts, tiny_tokenizer

from fedml_fibec import algorithm as alg
from fedml_fibec.data import EncodedSet
from fedml_fibec.core.local import evaluate, make_optimizer, train_steps
from fedml_fibec.models import transformer_blocks

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def lora(family: str, device) -> torch.nn.Module:
    model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family],
                                                                    lora_dropout=0.0, modules_to_save=["classifier"
                                                                    if family == "bert" else "score"]))
    with torch.no_grad():  # non-zero B so that A gets gradients too
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(device)


def encoded(n: int = 12) -> EncodedSet:
    texts, labels = tiny_texts(n, seed=3)
    b = tiny_batch(tiny_tokenizer(), texts, max_length=16)
    return EncodedSet(b["input_ids"].long(), b["attention_mask"].long(), torch.tensor(labels))


def test_gpu_mapping_file_keys_add_up():
    mapping = yaml.safe_load((ROOT / "config" / "gpu_mapping.yaml").read_text())
    processes = {key: sum(sum(gpus) for gpus in hosts.values()) for key, hosts in mapping.items()}
    # main job: client_num_per_round 10 + the server; gpu_check.sh: mpirun -np 3
    assert processes["mapping_1gpu"] == 11 and processes["mapping_8gpu"] == 11
    assert processes["mapping_1gpu_np3"] == 3
    assert len(mapping["mapping_8gpu"]["localhost"]) == 8
    for hosts in mapping.values():
        assert all(isinstance(n, int) and n >= 0 for gpus in hosts.values() for n in gpus)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("bf16", [False, True])
def test_train_and_evaluate_on_cuda(family, bf16):
    device = torch.device("cuda")
    model, data = lora(family, device), encoded()
    opt = make_optimizer(model, "adamw", 1e-3, 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = train_steps(model, data, [torch.arange(6), torch.arange(6, 12)], opt, device=device, max_grad_norm=1.0,
                       bf16=bf16)
    assert loss == loss and loss > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all(p.device.type == "cuda" for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights
    acc, ce = evaluate(model, data, batch_size=5, device=device, bf16=bf16)
    assert 0 <= acc <= 1 and ce > 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fisher_scores_on_cuda_match_cpu(family):
    data = encoded(8)
    cpu_model = lora(family, "cpu").eval()
    gpu_model = lora(family, "cuda").eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    # Inputs may come on the CPU: the scoring functions move them to the model's device.
    for fn in (alg.embedding_fisher_scores, alg.lora_fisher_scores):
        ref = fn(cpu_model, data.input_ids, data.attention_mask, data.labels)
        got = fn(gpu_model, data.input_ids, data.attention_mask, data.labels)
        assert got.device.type == "cuda"
        # TF32 matmuls on Ampere+ keep ~1e-3 relative precision
        torch.testing.assert_close(got.cpu(), ref, rtol=2e-2, atol=1e-6)
    scores = alg.score_dataset(gpu_model, data.input_ids.cuda(), data.attention_mask.cuda(), data.labels.cuda(),
                               batch_size=3)
    assert scores.device.type == "cuda" and scores.shape == (8,)
    g = torch.Generator(device="cuda").manual_seed(0)
    layer = alg.perturbation_layer_scores(gpu_model, data.input_ids, data.attention_mask,
                                          blocks=transformer_blocks(gpu_model), sigma=0.1, generator=g)
    assert layer.device.type == "cuda" and torch.isfinite(layer).all()


@pytest.mark.cuda
@needs_cuda
def test_sparse_update_on_cuda_keeps_unselected_rows():
    device = torch.device("cuda")
    model, data = lora("llama", device), encoded()
    params = {n: p for n, p in model.named_parameters() if "lora_" in n and ".layers.0." in n}
    # Masks come from CPU-side momentum in the trainer's state: SparseUpdate moves them.
    masks = {n: torch.arange(p.shape[0]) % 3 == 0 for n, p in params.items()}
    masks[next(iter(masks))] = torch.zeros_like(masks[next(iter(masks))])  # one module fully frozen
    before = {n: p.detach().clone() for n, p in params.items()}
    with alg.SparseUpdate(params, masks) as sparse:
        opt = make_optimizer(model, "adamw", 1e-2, 0.1)
        train_steps(model, data, [torch.arange(12)] * 2, opt, device=device, after_step=sparse.after_step)
    for n, p in params.items():
        keep = ~masks[n].to(device)
        assert torch.equal(p[keep], before[n][keep]), n
    first = next(iter(params))
    assert torch.equal(params[first], before[first]) and params[first].requires_grad
