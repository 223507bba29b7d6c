"""Small language models (Llama architecture) and encoders, quantized MobileQuant-style to integers."""
