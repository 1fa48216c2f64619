"""Reference runner for tests/test_rewards_imagereward.py: NOT a test module and never imported by the project.

It runs inside the isolated venv that holds the stock ``image-reward`` package (bench/make_imagereward_ref_venv.sh)
and scores PNG files through the package's own code path (PIL preprocessing, ``ImageReward.score``) plus its
differentiable entry ``score_gard`` on given pixels. Two things are redirected, both outside the model maths:
``BertTokenizer.from_pretrained('bert-base-uncased')`` reads a local vocabulary instead of the hub, and, when the
test uses a small ViT to stay fast, ``create_vit`` builds the package's own ``VisionTransformer`` at that size.
The checkpoint is loaded like ``ImageReward.load`` does, but the missing/unexpected key lists are reported.

    python tests/test_rewards_ir_reference.py --job job.json --out result.json
"""

if __name__ == "__main__":
    import argparse
    import json
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    job = json.load(open(args.job))

    import numpy as np
    import torch
    import transformers

    _from_pretrained = transformers.BertTokenizer.from_pretrained.__func__

    def _local_tokenizer(cls, name, *a, **k):
        if name == "bert-base-uncased":
            name, k["local_files_only"] = job["vocab_dir"], True
        return _from_pretrained(cls, name, *a, **k)

    transformers.BertTokenizer.from_pretrained = classmethod(_local_tokenizer)

    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP.vit import VisionTransformer

    vit = job.get("vit")
    if vit:
        def _small_vit(name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            enc = VisionTransformer(img_size=image_size, patch_size=16, embed_dim=vit["width"], depth=vit["depth"],
                                    num_heads=vit["heads"], use_grad_checkpointing=use_grad_checkpointing,
                                    ckpt_layer=ckpt_layer, drop_path_rate=drop_path_rate)
            return enc, vit["width"]

        blip_pretrain.create_vit = _small_vit

    model = ImageReward(med_config=job["med_config"], device="cpu")
    state = torch.load(job["checkpoint"], map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.eval()
    out = {"missing": list(missing), "unexpected": list(unexpected), "transformers": transformers.__version__}
    with torch.no_grad():
        out["scores"] = [float(model.score(p, f)) for p, f in zip(job["prompts"], job["images"])]
        if job.get("pixels"):
            pixels = torch.from_numpy(np.load(job["pixels"]))
            tok = model.blip.tokenizer(job["prompts"][: len(pixels)], padding="max_length", truncation=True, max_length=35,
                                       return_tensors="pt")
            out["score_gard"] = model.score_gard(tok.input_ids, tok.attention_mask, pixels).squeeze(-1).tolist()
        out["ids"] = model.blip.tokenizer(job["prompts"], padding="max_length", truncation=True,
                                          max_length=35).input_ids
        if job.get("tokenize_vocab_dir"):
            job["vocab_dir"] = job["tokenize_vocab_dir"]
            from ImageReward.models.BLIP.blip import init_tokenizer

            tok = init_tokenizer()
            out["tokenize_ids"] = tok(job["tokenize_prompts"], padding="max_length", truncation=True,
                                      max_length=35).input_ids
    with open(args.out, "w") as f:
        json.dump(out, f)
