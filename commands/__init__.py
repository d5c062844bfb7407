"""The `voxlm` commands that run the inference API: one module per command, each with the `add_parser(subparsers)`
that registers it (`voxlm.cli` names the module and imports it only when its command runs). The other commands live
beside the code they run: `quickstart.py`, `data/phantom_dataset.py`, `evaluation/cli.py`, `training/<stage>.py`,
`training/merge_lora.py`.
"""
