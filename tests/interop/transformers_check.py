"""Run by tests/interop/test_hf_interop.py under another transformers (``make test`` builds
``.venv-transformers4`` with 4.x; tests never download): what that version writes for a
Fable export and for a GPT-2 directory, as a user of it would ask.

    python tests/interop/transformers_check.py JOB.json   # prints a JSON answer
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    torch.set_num_threads(1)
    answer = {"transformers": transformers.__version__, "export": [], "pipeline": [], "gpt2": []}
    tokenizer = AutoTokenizer.from_pretrained(job["export"])
    model = AutoModelForCausalLM.from_pretrained(job["export"]).eval()
    for prompt in job["prompts"]:
        encoded = tokenizer(prompt, return_tensors="pt")  # what a user passes on: **encoded
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=job["max_new_tokens"],
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, encoded["input_ids"].shape[1]:]
        answer["export"].append(tokenizer.decode(new, skip_special_tokens=True))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    for prompt in job["prompts"]:
        answer["pipeline"].append(pipe(prompt, do_sample=False, max_new_tokens=job["max_new_tokens"],
                                       return_full_text=False)[0]["generated_text"])
    gpt2_tokenizer = AutoTokenizer.from_pretrained(job["gpt2"])
    gpt2 = AutoModelForCausalLM.from_pretrained(job["gpt2"]).eval()
    for prompt in job["prompts"]:
        ids = gpt2_tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = gpt2.generate(**ids, do_sample=False, max_new_tokens=job["max_new_tokens"],
                                pad_token_id=gpt2_tokenizer.eos_token_id)
        answer["gpt2"].append(out[0, ids["input_ids"].shape[1]:].tolist())
    print(json.dumps(answer))


if __name__ == "__main__":
    main(sys.argv[1])
