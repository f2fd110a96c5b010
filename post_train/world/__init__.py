"""The embedded demo world: synthetic symbol tasks with an exact gold reward.

Data side: `params` (`WorldParams`), `generate` (`build_world`/`write_world`), `families`, `demonstrator`,
`reward` (`gold_reward`). Model side, which imports transformers: `model` (`train_tokenizer`,
`tiny_llama_config`). The package re-exports nothing, so a stage that reads a world's prompts (its families, its
reward) does not depend on the generator's code.
"""
