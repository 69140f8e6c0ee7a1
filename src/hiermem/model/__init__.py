from hiermem.model.fetched import FetchedMemory

__all__ = ["FetchedMemory"]
