"""The client side: what runs on the user's machine. `library` submits
encrypted jobs and streams their answers (its public names are re-exported
by `encrypted_vllm`); `cli` is its command line; `gateway/` serves OpenAI's
API on top of it. Importing this package imports nothing, so that the
command lines' `--help` stays instant."""
