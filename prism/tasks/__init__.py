"""Tasks that plug into prism through `prism.core.task.Task`, chosen by name (`data.task`). The library
never imports this package; a run imports the task it names."""
