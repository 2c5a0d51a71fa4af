"""Data files of the symptom model: knowledge base, ConText rules, evaluation notes."""
