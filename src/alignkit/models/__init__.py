from alignkit.models.load import load_model, load_tokenizer, save_pretrained

__all__ = ["load_model", "load_tokenizer", "save_pretrained"]
