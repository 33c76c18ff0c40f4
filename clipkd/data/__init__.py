"""The data layer: dataset specs -> readers -> few-shot draw -> base/new split -> loaders (and their transforms).

Importing this package (and its readers, few-shot and split modules) does not import torch.
"""
