"""User data: LaMP files, the JSONL history format, the embedded generator, batching."""

from milp.data.datamodule import PromptFormat, UserDataModule
from milp.data.users import HistoryPair, Query, User

__all__ = ["HistoryPair", "PromptFormat", "Query", "User", "UserDataModule"]
