"""softprompt: adapt frozen open-weight LLMs to your tasks with soft prompts."""

__version__ = "0.2.0"
