"""Widgets of the prompt screen: header, prompt input, token stream, probability and perplexity panels."""
