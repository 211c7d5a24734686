"""A DPO script written exactly as for TRL (like TRL's examples/scripts/dpo.py): no trl_dpo_plus import.

With TRL:              python examples/trl_dpo_script.py --dataset_name DATA --model_name_or_path MODEL ...
With trl-dpo-plus:     trl-dpo-plus run examples/trl_dpo_script.py --loss_type simpo ... (same arguments)
"""

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    trainer = DPOTrainer(
        model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
