-- One row per inbound SMS: the reply, the campaign message it answered (when the provider
-- tied it to one), its keyword and whether it reads as a complaint.

with

inbound as (

    select * from {{ ref('int_inbound_classified') }}

),

messages as (

    select * from {{ ref('stg_ops__messages') }}

),

final as (

    select
        inbound.inbound_id,
        messages.campaign_id,
        messages.variant,
        inbound.in_reply_to_message_id as message_id,
        coalesce(inbound.contact_id, messages.contact_id) as contact_id,
        inbound.from_e164 as phone_e164,
        inbound.body,
        inbound.keyword,
        inbound.is_complaint,
        inbound.complaint_kind,
        inbound.received_at
    from inbound
    left join messages
        on inbound.in_reply_to_message_id = messages.message_id

)

select * from final
