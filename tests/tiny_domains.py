"""A multi-domain dataset in memory for the pipeline tests (the MultiDomainDataset protocol):
class = a fixed random pattern, domain = a colour shift, plus per-image noise."""
import torch


class TinyDomains:
    def __init__(self, D=3, K=3, size=8, n_train=12, n_test=6, seed=0, noise=0.5, style_scale=1.0,
                 mean=(0.0,) * 3, std=(1.0,) * 3):
        g = torch.Generator().manual_seed(seed)
        self.domains = [f"d{i}" for i in range(D)]
        self.classes = [f"c{k}" for k in range(K)]
        self.image_shape = (3, size, size)
        self.mean, self.std = tuple(mean), tuple(std)
        protos = torch.randn(K, 3, size, size, generator=g)
        styles = style_scale * torch.randn(D, 3, 1, 1, generator=g)
        self.calls = []  # every real_batch request: (domain, label, n, split)
        self._x = {(self.domains[d], split): [protos[c] + styles[d] + noise * torch.randn(n, 3, size, size, generator=g)
                                              for c in range(K)]
                   for d in range(D) for split, n in (("train", n_train), ("test", n_test))}

    def count(self, domain, label, split="train"):
        return len(self._x[domain, split][label])

    def real_batch(self, domain, label, n, generator=None, split="train"):
        self.calls.append((domain, label, n, split))
        x = self._x[domain, split][label]
        idx = (torch.randperm(len(x), generator=generator)[:n] if n <= len(x)
               else torch.randint(len(x), (n,), generator=generator))
        return x[idx].clone()

    def split_tensors(self, domains, split="test"):
        xs = [torch.cat(self._x[d, split]) for d in domains]
        ys = [torch.arange(len(self.classes)).repeat_interleave(len(self._x[d, split][0])) for d in domains]
        return torch.cat(xs), torch.cat(ys)


class CrashingDomains(TinyDomains):
    """Raises ``error`` once ``real_batch`` has been called ``limit`` times (a run killed mid-way)."""

    def __init__(self, limit, error=KeyboardInterrupt, **kw):
        super().__init__(**kw)
        self.limit, self.error = limit, error

    def real_batch(self, *a, **kw):
        if len(self.calls) >= self.limit:
            raise self.error("killed")
        return super().real_batch(*a, **kw)
