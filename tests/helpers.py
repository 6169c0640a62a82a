"""A base for the tests' in-memory training sources: the loader interface the trainer uses
(``state_dict``/``load_state_dict``/``stats``) over a batch counter ``i``; subclasses yield
``(inputs, targets)`` from ``__iter__`` as a function of ``i``, so a resumed run continues exactly."""


class CountedBatches:
    def __init__(self):
        self.i = 0

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, states):
        self.i = states[0]["i"]

    def stats(self):
        return {"batches": self.i}
