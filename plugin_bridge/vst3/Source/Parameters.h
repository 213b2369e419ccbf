// Parameters: named so that pedalboard exposes them as plain attributes. pedalboard appends a
// parameter's *label* to its Python name (gain_db with label "dB" would become gain_db_db), so no
// parameter here has a label: the unit is in the name (vocals_gain_db), as everywhere in unbake.
#pragma once

#include <juce_audio_processors/juce_audio_processors.h>

#include <array>
#include <string>

namespace unbake
{
// Stems with a gain and a mute. "accompaniment" is everything but vocals: for a model that has an
// accompaniment stem (spleeter-2stems) its own gain; for the others it scales every stem but vocals.
inline constexpr std::array<const char*, 7> kStemNames { "vocals", "drums", "bass", "other", "guitar", "piano",
                                                         "accompaniment" };
inline constexpr int kAccompaniment = 6;

// Models and presets offered by the "model" choice (presets/models.toml); index 0 is the default.
inline const juce::StringArray& modelChoices()
{
    static const juce::StringArray m { "spleeter-2stems", "htdemucs", "htdemucs_ft", "htdemucs_6s", "hdemucs_mmi" };
    return m;
}

inline constexpr float kMinGainDb = -60.0f, kMaxGainDb = 12.0f;

juce::AudioProcessorValueTreeState::ParameterLayout createParameterLayout();

juce::String gainId (int stem);
juce::String muteId (int stem);
inline const char* kModelId = "model";
inline const char* kEndpointProperty = "endpoint";

// Linear gain of a stem the model returns, from the parameters (not real-time: call off the audio
// thread or with the raw atomics, see PluginProcessor::stemGains).
int stemIndex (const std::string& name); // index in kStemNames, or -1
} // namespace unbake
