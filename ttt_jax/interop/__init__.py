"""Other formats: Hugging Face (safetensors) and GGUF Llama-family import and export, and fetching
pretrained model files."""
