"""User data: LaMP files, the JSONL history format, Chit-Chat, the embedded generator,
retrieval-in-prompt and batching. Import the submodules directly (`milp.data.users`,
`milp.data.datamodule`, ...); this package file imports nothing, so no import order can
form a cycle."""
